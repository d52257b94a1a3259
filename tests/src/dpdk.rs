//! Debian's `dpdk-testpmd` as a mirror consumer (networking-spp's DPDK
//! role): receiving (rxonly) on an interface through DPDK's AF_PACKET
//! driver, in a namespace, its port counters read when it stops.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

pub struct Testpmd {
    child: Child,
    lines: Receiver<String>,
    output: Vec<String>,
}

impl Testpmd {
    /// Starts it on `interface` of namespace `netns` and waits until it
    /// forwards (20 s at most).
    pub fn start(netns: &str, interface: &str) -> Result<Self, String> {
        // No hugepages (malloc'd memory is enough for AF_PACKET), no shared
        // files, one forwarding core beside the main one; stdout
        // line-buffered (stdbuf), so its prompt reaches the pipe.
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(["stdbuf", "-oL", "dpdk-testpmd"])
            .args([
                "--no-pci",
                "--no-huge",
                "-m",
                "256",
                "--no-shconf",
                "-l",
                "0,1",
            ])
            .arg(format!("--vdev=net_af_packet0,iface={interface}"))
            .args(["--", "--forward-mode=rxonly", "--total-num-mbufs=2048"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("dpdk-testpmd (Debian's dpdk-dev; cargo xtask setup installs it): {e}")
            })?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut testpmd = Testpmd {
            child,
            lines,
            output: Vec::new(),
        };
        loop {
            match testpmd.lines.recv_timeout(Duration::from_secs(20)) {
                Ok(line) => {
                    let ready = line.contains("Press enter to exit");
                    testpmd.output.push(line);
                    if ready {
                        return Ok(testpmd);
                    }
                }
                Err(_) => return Err(format!("dpdk-testpmd did not start: {:#?}", testpmd.output)),
            }
        }
    }

    /// Its process id (`ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it (Enter) and returns the packets its port received, with
    /// everything it printed.
    pub fn stop(mut self) -> (Result<u64, String>, Vec<String>) {
        let told = self
            .child
            .stdin
            .take()
            .map(|mut stdin| stdin.write_all(b"\n"));
        if !matches!(told, Some(Ok(()))) {
            // Its output ends only when it does.
            let _ = self.child.kill();
        }
        self.output.extend(self.lines.iter());
        let exited = self.child.wait().map(|s| s.success());
        let output = std::mem::take(&mut self.output);
        if !matches!(told, Some(Ok(()))) || !matches!(exited, Ok(true)) {
            return (Err("dpdk-testpmd did not stop cleanly".into()), output);
        }
        let received = output
            .iter()
            .skip_while(|l| !l.contains("Forward statistics for port 0"))
            .find_map(|l| {
                let rest = l.trim().strip_prefix("RX-packets:")?;
                rest.split_whitespace().next()?.parse().ok()
            })
            .ok_or_else(|| "no RX-packets in its statistics".to_string());
        (received, output)
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
