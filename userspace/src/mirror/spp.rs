//! The networking-spp etcd contract (being written).
