//! pcap files (being written).
