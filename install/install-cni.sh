#!/bin/sh
# DaemonSet entrypoint: the host's CNI dirs as mounted in the container come from the
# environment; then the installer replaces this shell, so it receives SIGTERM directly (and
# leaves the node intercepting, unless UNINSTALL_ON_EXIT=true). GENERATION is the DaemonSet's
# pod-template-generation: of two installers on a node, the higher one's entry wins.
set -eu

CNI_CONF_DIR="${CNI_CONF_DIR:-/host/etc/cni/net.d}"
CNI_BIN_DIR="${CNI_BIN_DIR:-/host/opt/cni/bin}"
PLUGIN_CONFIG="${PLUGIN_CONFIG:-}"
GENERATION="${GENERATION:-}"
UNINSTALL_ON_EXIT="${UNINSTALL_ON_EXIT:-false}"

set -- install --watch --cni-conf-dir "$CNI_CONF_DIR" --cni-bin-dir "$CNI_BIN_DIR"
if [ -n "$PLUGIN_CONFIG" ]; then
    set -- "$@" --plugin-config "$PLUGIN_CONFIG"
fi
if [ -n "$GENERATION" ]; then
    set -- "$@" --generation "$GENERATION"
fi
if [ "$UNINSTALL_ON_EXIT" = true ]; then
    set -- "$@" --uninstall-on-exit
fi
exec /usr/local/bin/intercept-cni "$@"
