"""A cluster service manager for the NetManager tests, following the message
flows of oakestra-net's cluster-service-manager (interfaces/mqtt_client.py,
network/tablequery/, operations/instances_management.py) with an in-memory
job store instead of MongoDB and the root service manager.

  nodes/<id>/net/subnet {"METHOD": "GET"}
      -> nodes/<id>/net/subnetwork/result {"address", "addressv6"}
  nodes/<id>/net/service/deployed {appname, status, instance_number, nsip, nsipv6, host_ip, host_port}
      -> the instance gets its addresses; jobs/<job>/updates_available {"type": "DEPLOYMENT"}
         (Oakestra: the root's instance update reaching the cluster)
  nodes/<id>/net/service/address-changed {appname, instance_number, host_ip, host_port}
      -> the instance's host_ip, host_port (an int, as mongo_update_job_address
         stores it) and worker_id; jobs/<job>/updates_available {"type": "DEPLOYMENT"}
         (network/deployment.py deployment_address_update)
  nodes/<id>/net/service/undeployed {appname, instance_number}
      -> the instance loses its deployment; jobs/<job>/updates_available {"type": "UNDEPLOYMENT"}
         (Oakestra: the cluster orchestrator's undeployment, through the root)
  nodes/<id>/net/tablequery/request {sname, sip}
      -> interest added; nodes/<id>/net/tablequery/result {app_name, instance_list, query_key}
  nodes/<id>/net/interest/remove {appname} -> interest removed

Every message received is printed as one JSON line (topic, payload, t).

Usage: cluster_service_manager.py PORT JOBS_JSON SUBNET_BASE
  JOBS_JSON: {job: {"service_ip_list": [{IpType, Address, Address_v6}],
                    "instances": [{instance_number, instance_ip, ...deployed fields}]}}
  SUBNET_BASE: first /26 handed out (e.g. 192.0.2.0); each request gets the next.
"""

import copy
import ipaddress
import json
import sys
import threading
import time

import paho.mqtt.client as paho_mqtt

port = int(sys.argv[1])
jobs = json.loads(sys.argv[2])
next_subnet = ipaddress.IPv4Address(sys.argv[3])
interests = {}
lock = threading.Lock()
client = paho_mqtt.Client(paho_mqtt.CallbackAPIVersion.VERSION2, client_id="csm")


def log(**fields):
    fields["t"] = time.time()
    print(json.dumps(fields), flush=True)


def publish(topic, payload):
    client.publish(topic, json.dumps(payload), qos=1)
    log(published=topic, payload=payload)


def instance(job, number):
    for i in jobs[job]["instances"]:
        if i["instance_number"] == number:
            return i
    return None


def resolve_ip(sip):
    """The job one of whose service IPs or instance IPs is sip."""
    for name, job in jobs.items():
        if any(s["Address"] == sip or s.get("Address_v6") == sip for s in job["service_ip_list"]):
            return name
        if any(i.get("instance_ip") == sip for i in job["instances"]):
            return name
    return None


def instance_response(job):
    """format_instance_response: each instance with the job's service IPs
    and its own instance IP (IpType "instance_ip")."""
    out = []
    for i in copy.deepcopy(jobs[job]["instances"]):
        i["service_ip"] = copy.deepcopy(jobs[job]["service_ip_list"])
        i["service_ip"].append(
            {
                "IpType": "instance_ip",
                "Address": i.get("instance_ip", ""),
                "Address_v6": i.get("instance_ip_v6", ""),
            }
        )
        out.append(i)
    return out


def on_connect(c, userdata, flags, reason_code, properties):
    c.subscribe("nodes/+/net/#", qos=1)
    log(connected=str(reason_code))


def on_message(c, userdata, message):
    global next_subnet
    topic = message.topic
    payload = json.loads(message.payload.decode())
    log(topic=topic, payload=payload, qos=message.qos)
    client_id = topic.split("/")[1]
    what = topic.split("/net/", 1)[1]
    with lock:
        if what == "subnet" and payload.get("METHOD") == "GET":
            address = str(next_subnet)
            next_subnet += 64
            publish(
                "nodes/" + client_id + "/net/subnetwork/result",
                {"address": address, "addressv6": ""},
            )
        elif what == "service/deployed":
            job = payload["appname"]
            i = instance(job, payload["instance_number"])
            i.update(
                status=payload.get("status"),
                namespace_ip=payload.get("nsip"),
                namespace_ip_v6=payload.get("nsipv6"),
                host_ip=payload.get("host_ip"),
                host_port=payload.get("host_port"),
                worker_id=client_id,
            )
            publish("jobs/" + job + "/updates_available", {"type": "DEPLOYMENT"})
        elif what == "service/address-changed":
            job = payload["appname"]
            i = instance(job, payload["instance_number"])
            i.update(
                host_ip=payload.get("host_ip"),
                host_port=int(payload.get("host_port")),
                worker_id=client_id,
            )
            publish("jobs/" + job + "/updates_available", {"type": "DEPLOYMENT"})
        elif what == "service/undeployed":
            job = payload["appname"]
            i = instance(job, payload["instance_number"])
            for key in ("status", "namespace_ip", "namespace_ip_v6", "host_ip", "host_port"):
                i.pop(key, None)
            publish("jobs/" + job + "/updates_available", {"type": "UNDEPLOYMENT"})
        elif what == "tablequery/request":
            sip = payload.get("sip")
            name = payload.get("sname")
            if sip:
                key = sip
                name = resolve_ip(sip)
            else:
                key = name
            result = {"app_name": name, "instance_list": [], "query_key": key}
            if name in jobs:
                interests.setdefault(name, set()).add(client_id)
                result["instance_list"] = instance_response(name)
            publish("nodes/" + client_id + "/net/tablequery/result", result)
        elif what == "interest/remove":
            interests.get(payload.get("appname"), set()).discard(client_id)


client.on_connect = on_connect
client.on_message = on_message
client.connect("127.0.0.1", port, keepalive=5)
client.loop_forever()
