//! nftables backend: one table owned by the plugin, built and sent in one netlink batch.
