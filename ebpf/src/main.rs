//! tapmesh kernel programs. Each program has one `try_` function returning a
//! typed error; `xdp_outcome` / `tc_outcome` turn results into verdicts and
//! counters in one place.
#![no_std]
#![allow(internal_features)]
#![feature(core_intrinsics, adt_const_params)]
#![no_main]

mod csum;
mod detour;
mod headers;
mod lb;
mod maps;
mod mirror;
mod offload;
mod overlay;
mod overlay6;
mod packet;
mod parse;
mod port_nat;
mod probes;
mod stats;
mod tc;
mod tunnel;
mod xdp;
mod xmit;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
