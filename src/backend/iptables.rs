//! iptables backend: nat-table chains applied with `iptables-{legacy,nft}-restore --noflush`.
