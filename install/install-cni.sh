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
# The agent's HTTP endpoints (/healthz, /readyz, /metrics) and the host root its host check reads.
LISTEN_ADDR="${LISTEN_ADDR:-}"
HOST_ROOT="${HOST_ROOT:-}"
# The repair of running pods: the runtime's CRI socket and the interval in seconds (0: off).
CRI_SOCKET="${CRI_SOCKET:-}"
REPAIR_INTERVAL="${REPAIR_INTERVAL:-}"

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
if [ -n "$LISTEN_ADDR" ]; then
    set -- "$@" --listen "$LISTEN_ADDR"
fi
if [ -n "$HOST_ROOT" ]; then
    set -- "$@" --host-root "$HOST_ROOT"
fi
if [ -n "$CRI_SOCKET" ]; then
    set -- "$@" --cri-socket "$CRI_SOCKET"
fi
if [ -n "$REPAIR_INTERVAL" ]; then
    set -- "$@" --repair-interval "$REPAIR_INTERVAL"
fi
exec /usr/local/bin/intercept-cni "$@"
