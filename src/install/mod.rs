//! The node installer: chain the plugin into the active CNI network config and keep it there.
