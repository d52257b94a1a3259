//! `cargo xtask bench` (`tapmesh-bench [BENCHMARKS.md]`): every family of
//! `tapmesh_tests::bench` in one run, printed and written to the file.
//! `tapmesh-bench rows` prints the repeat = 1 packet-path rows only (a quick
//! check while working on a path), `tapmesh-bench overlay` the overlay's
//! rows and rates (`overlay-rows`, `overlay-rates`: one or the other; `compare-decap ROUNDS
//! OBJECT...`: the IPv4 decapsulation rows of several builds, interleaved),
//! `lb-rates` the VIP load balancer on veth, `tapmesh-bench control` the TAPA Open → OPEN latency, `tapmesh-bench
//! mirror` the mirroring section, `tapmesh-bench maglev` the Maglev table
//! write, `tapmesh-bench eds` the EDS update latency, `tapmesh-bench xds`
//! EDS through a real gRPC xDS server, `tapmesh-bench paths` every
//! BPF_PROG_TEST_RUN row (packet paths and building blocks;
//! `TAPMESH_BENCH_MEAN=1`: trimmed means, for comparing two builds in one
//! run).

use tapmesh_tests::{
    bench::{self, lb},
    bpf::Bpf,
};

fn main() {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "BENCHMARKS.md".into());
    match out.as_str() {
        "rows" => {
            let mut bpf = Bpf::load();
            let mut writer = lb::load(&mut bpf);
            for (name, raw, floor) in bench::single_run_rows(&mut bpf, &mut writer) {
                println!("{:6.1} net ({raw:.0} − {floor:.0})  {name}", raw - floor);
            }
        }
        "overlay" => {
            for (name, raw, floor) in bench::overlay_rows() {
                println!(
                    "{name}: {raw:.1} ns, floor {floor:.1} ns, net {:.1} ns",
                    raw - floor
                );
            }
            print!("{}", bench::overlay::rates());
        }
        "overlay-rates" => print!("{}", bench::overlay::rates()),
        "lb-rates" => print!("{}", bench::lb_veth::rates()),
        "overlay-rows" => {
            for (name, raw, floor) in bench::overlay_rows() {
                println!("{:6.1} net ({raw:.0} − {floor:.0})  {name}", raw - floor);
            }
        }
        // `compare-vip ROUNDS OBJECT...`: the same for the local target's paths.
        "compare-vip" => {
            let a: Vec<String> = std::env::args().skip(2).collect();
            print!(
                "{}",
                bench::compare_vip(&a[1..], a[0].parse().expect("a round count"))
            );
        }
        // `compare-decap ROUNDS OBJECT...`: builds of the BPF object side by side.
        "compare-decap" => {
            let a: Vec<String> = std::env::args().skip(2).collect();
            print!(
                "{}",
                bench::compare_decap(&a[1..], a[0].parse().expect("a round count"))
            );
        }
        "control" => print!("{}", bench::control::open_latency()),
        "mirror" => print!("{}", bench::mirror::rates()),
        "maglev" => print!("{}", bench::maglev::table_write()),
        "eds" => print!("{}", bench::eds::update_latency()),
        "xds" => print!("{}", bench::xds::through_grpc()),
        "cluster" => {
            print!("{}", bench::cluster::registration_latency());
            print!("\n{}", bench::cluster::many_targets());
        }
        "cluster-many" => print!("{}", bench::cluster::many_targets()),
        // etcd's part of `cluster`, run inside a node's namespace.
        "etcd-claims" => {
            let a: Vec<String> = std::env::args().skip(2).collect();
            bench::cluster::etcd_claims(&a[0], a[1].parse().expect("a count"));
        }
        // One node's share of `cluster-many`, run inside its namespace.
        "register-many" => {
            let a: Vec<String> = std::env::args().skip(2).collect();
            let number = |s: &str| s.parse().expect("a number");
            bench::cluster::register_many(&a[0], number(&a[1]), number(&a[2]), number(&a[3]));
        }
        "paths" => {
            let paths = bench::paths();
            print!("{}\n\n{}\n{}", paths.targets, paths.table, paths.blocks);
        }
        flag if flag.starts_with('-') => {
            eprintln!(
                "usage: tapmesh-bench [OUT.md | rows | overlay | overlay-rows | overlay-rates | lb-rates | \
                 control | mirror | maglev | eds | xds | cluster | cluster-many | paths | compare-decap ROUNDS OBJECT... | compare-vip ROUNDS OBJECT...]\n\
                 with no argument or a file name: every family, written to that file (default BENCHMARKS.md)"
            );
            std::process::exit(if flag == "-h" || flag == "--help" {
                0
            } else {
                2
            });
        }
        _ => {
            let doc = bench::report();
            print!("{doc}");
            std::fs::write(&out, doc).unwrap_or_else(|e| panic!("writing {out}: {e}"));
            eprintln!("written to {out}");
        }
    }
}
