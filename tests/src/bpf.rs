//! The embedded BPF object loaded on its own (no pins, no attach) for
//! BPF_PROG_TEST_RUN: golden-packet tests and benchmarks.

use std::time::Duration;

use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use tapmesh::dataplane::{read_counters, BPF_OBJECT};
use tapmesh_common::{program_names, ProgramSlot, ProgramStats};

/// A private copy of the object: its own maps, so tests run in parallel.
pub struct Bpf {
    pub ebpf: Ebpf,
    /// The interface XDP runs say the packet came in on (0: the default,
    /// loopback). Must exist in the caller's network namespace.
    pub ingress_ifindex: u32,
}

/// What one test run returned.
pub struct Run {
    pub action: u32,
    pub duration: Duration,
    pub output: Vec<u8>,
}

impl Bpf {
    /// The embedded object, or the file `TAPMESH_BENCH_OBJECT` names (a
    /// build with the same map layout: the bench compares two builds in one
    /// run).
    pub fn load() -> Self {
        let other = std::env::var_os("TAPMESH_BENCH_OBJECT")
            .map(|path| std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path:?}: {e}")));
        Self::load_bytes(other.as_deref().unwrap_or(BPF_OBJECT))
    }

    /// The BPF object in `path` (a build with the same map layout).
    pub fn load_file(path: &str) -> Self {
        Self::load_bytes(&std::fs::read(path).unwrap_or_else(|e| panic!("reading {path}: {e}")))
    }

    fn load_bytes(object: &[u8]) -> Self {
        let mut ebpf = Ebpf::load(object).expect("loading the BPF object");
        for name in [
            program_names::XDP_UPLINK,
            program_names::XDP_FLOOR,
            program_names::XDP_MIRROR,
        ] {
            let p: &mut Xdp = ebpf.program_mut(name).expect(name).try_into().expect("xdp");
            p.load()
                .unwrap_or_else(|e| panic!("verifier rejected {name}: {e}"));
        }
        // An object of another build (a bench baseline) may predate tails.
        if ebpf.program(program_names::XDP_PORT_NAT).is_some() {
            tapmesh::dataplane::install_tails(&mut ebpf).expect("the uplink's tail programs");
        }
        for name in [
            program_names::TC_INGRESS,
            program_names::TC_EGRESS,
            program_names::TC_FLOOR,
            program_names::TC_TAP_OUT,
            program_names::TC_TAP_IN,
            program_names::TC_SERVICE,
            program_names::TC_CONDUIT,
        ] {
            let p: &mut SchedClassifier =
                ebpf.program_mut(name).expect(name).try_into().expect("tc");
            p.load()
                .unwrap_or_else(|e| panic!("verifier rejected {name}: {e}"));
        }
        Bpf {
            ebpf,
            ingress_ifindex: 0,
        }
    }

    /// Runs a program (XDP or TC by its name) once or `repeat` times on `frame`.
    pub fn run(&mut self, program: &str, frame: &[u8], repeat: u32) -> Run {
        self.try_run(program, frame, repeat)
            .unwrap_or_else(|e| panic!("test_run {program} on {} bytes: {e}", frame.len()))
    }

    /// Like [`Bpf::run`], returning the kernel's refusal as an error.
    pub fn try_run(&mut self, program: &str, frame: &[u8], repeat: u32) -> Result<Run, String> {
        let mut out = vec![0u8; frame.len() + 256];
        // xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let md: Vec<u8> = [0, frame.len() as u32, 0, self.ingress_ifindex, 0, 0]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let mut opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        };
        let p = self.ebpf.program_mut(program).expect(program);
        let result = if let Ok(xdp) = <&mut Xdp>::try_from(&mut *p) {
            if self.ingress_ifindex != 0 {
                opts.ctx_in = Some(&md);
            }
            xdp.test_run(opts)
        } else {
            <&mut SchedClassifier>::try_from(p)
                .expect("xdp or tc")
                .test_run(opts)
        }
        .map_err(|e| format!("{e:?}"))?;
        out.truncate(result.data_size_out as usize);
        Ok(Run {
            action: result.return_value,
            duration: result.duration,
            output: out,
        })
    }

    /// One XDP run of `frame` with `meta` before it as XDP metadata (as a
    /// veth peer's XDP program can send it); the output starts at whatever
    /// metadata the program left.
    pub fn run_with_meta(&mut self, program: &str, meta: &[u8], frame: &[u8]) -> Run {
        let data_in = [meta, frame].concat();
        let mut out = vec![0u8; data_in.len() + 256];
        // xdp_md: data (the metadata's length), data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let md: Vec<u8> = [
            meta.len() as u32,
            data_in.len() as u32,
            0,
            self.ingress_ifindex,
            0,
            0,
        ]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
        let opts = TestRunOptions {
            data_in: Some(&data_in),
            data_out: Some(&mut out),
            ctx_in: Some(&md),
            repeat: 1,
            ..TestRunOptions::default()
        };
        let p = self.ebpf.program_mut(program).expect(program);
        let result = <&mut Xdp>::try_from(p)
            .expect("an XDP program")
            .test_run(opts)
            .unwrap_or_else(|e| panic!("test_run {program} with metadata: {e:?}"));
        out.truncate(result.data_size_out as usize);
        Run {
            action: result.return_value,
            duration: result.duration,
            output: out,
        }
    }

    /// Counters of one program, summed over CPUs.
    pub fn stats(&self, slot: ProgramSlot) -> ProgramStats {
        read_counters(&self.ebpf)
            .expect("reading tm_stats")
            .into_iter()
            .find(|c| c.slot == slot)
            .expect("slot present")
            .stats
    }
}
