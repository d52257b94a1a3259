//! AF_XDP mirror rings (being written).
