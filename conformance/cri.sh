# Sourced by conformance/run: the kubelet path. A private containerd with its CRI plugin (own
# root, state, sockets, CNI conf and bin dirs under WORK) is driven by icni-cri-driver
# (conformance/cri-driver, on the k8s-cri crate) exactly as kubelet drives it: RunPodSandbox with
# metadata, labels and annotations, CreateContainer/StartContainer, StopPodSandbox,
# RemovePodSandbox. The network is what `intercept-cni install` makes of a bridge + host-local
# conflist, with the plugin's defaults (podSelection annotated).
#
# The bridge lives in the host netns (containerd runs there): the suite creates it with its
# addresses (10.233.2.1/24 and fd00:233:2::1/64, a ULA of its own) and `isGateway: false`, so
# the bridge plugin turns on no forwarding; pods and host talk on-link only.

CRI_BRIDGE=icni-cri0
CRI_SUBNET4=10.233.2.0/24
CRI_GW4=10.233.2.1
CRI_SUBNET6=fd00:233:2::/64
CRI_GW6=fd00:233:2::1
CRI_NETWORK=icni-cri
CRI_EXCLUDED_NS=icni-excluded
ISTIO_IN=15006
ISTIO_OUT=15001
ISTIO_UID=1337
LINKERD_IN=4143
LINKERD_OUT=4140
LINKERD_UID=2102
PARALLEL_PODS=20

# What Istio's injector writes on a pod when istio-cni does the redirection (istio 1.2x: the
# istio-validation init container instead of istio-init, which would program the pod itself),
# and Linkerd's.
ISTIO_ANNOTATIONS='{"sidecar.istio.io/status": "{\"initContainers\":[\"istio-validation\"],\"containers\":[\"istio-proxy\"],\"volumes\":[\"istio-envoy\",\"istio-data\",\"istio-podinfo\",\"istio-token\",\"istiod-ca-cert\"],\"imagePullSecrets\":null,\"revision\":\"default\"}",
 "kubectl.kubernetes.io/default-container": "app", "kubectl.kubernetes.io/default-logs-container": "app",
 "prometheus.io/path": "/stats/prometheus", "prometheus.io/port": "15020", "prometheus.io/scrape": "true",
 "sidecar.istio.io/interceptionMode": "REDIRECT", "traffic.sidecar.istio.io/includeInboundPorts": "*",
 "traffic.sidecar.istio.io/excludeInboundPorts": "15020", "traffic.sidecar.istio.io/includeOutboundIPRanges": "*",
 "traffic.sidecar.istio.io/excludeOutboundIPRanges": "", "istio.io/rev": "default",
 "kubernetes.io/config.seen": "2024-01-01T00:00:00Z", "kubernetes.io/config.source": "api"}'
# The same pod with a dual-stack proxy (ISTIO_DUAL_STACK in its proxy config): as with istio-cni,
# only then are its IPv6 connections redirected too.
ISTIO_DS_ANNOTATIONS=$(python3 -c 'import json, sys
a = json.loads(sys.argv[1])
a["proxy.istio.io/config"] = "proxyMetadata:\n  ISTIO_DUAL_STACK: \"true\"\n"
print(json.dumps(a))' "$ISTIO_ANNOTATIONS")
LINKERD_ANNOTATIONS='{"linkerd.io/created-by": "linkerd/proxy-injector stable-2.14.10",
 "linkerd.io/inject": "enabled", "linkerd.io/proxy-version": "stable-2.14.10",
 "linkerd.io/trust-root-sha256": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
 "viz.linkerd.io/tap-enabled": "true", "kubernetes.io/config.source": "api"}'

cri() { "$CRI_DRIVER" "$WORK/cri/containerd.sock" "$@"; }

cri_containerd_config() {
	local d=$WORK/cri
	cat >"$d/containerd.toml" <<-EOF
		version = 2
		root = "$d/root"
		state = "$d/state"
		disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
		  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
		  "io.containerd.snapshotter.v1.overlayfs"]
		[grpc]
		  address = "$d/containerd.sock"
		[ttrpc]
		  address = "$d/containerd.sock.ttrpc"
		[plugins."io.containerd.internal.v1.opt"]
		  path = "$d/opt"
		[plugins."io.containerd.grpc.v1.cri"]
		  sandbox_image = "$CRI_PAUSE"
		  # runc here cannot lower the OOM score of a process started at a lower one.
		  restrict_oom_score_adj = true
		  stream_server_address = "127.0.0.1"
		  stream_server_port = "0"
		  enable_selinux = false
		  [plugins."io.containerd.grpc.v1.cri".containerd]
		    snapshotter = "native"
		    default_runtime_name = "runc"
		    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
		      runtime_type = "io.containerd.runc.v2"
		      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
		        # runc's state, by default in /run/containerd/runc.
		        Root = "$d/runc"
		  [plugins."io.containerd.grpc.v1.cri".cni]
		    bin_dir = "$d/bin"
		    conf_dir = "$d/net.d"
		    max_conf_num = 1
	EOF
}

cri_start_containerd() {
	containerd --config "$WORK/cri/containerd.toml" >>"$WORK/cri/containerd.log" 2>&1 &
	echo $! >"$WORK/cri/containerd.pid"
	for _ in $(seq 150); do
		ctr --address "$WORK/cri/containerd.sock" version >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	tail -n 20 "$WORK/cri/containerd.log"
	return 1
}

cri_stop_containerd() {
	local pid
	pid=$(cat "$WORK/cri/containerd.pid" 2>/dev/null) || return 0
	[[ -n $pid ]] || return 0
	kill "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	: >"$WORK/cri/containerd.pid"
}

# The pause and app images: Debian's static busybox, two tags of one umoci layout, imported
# into containerd's k8s.io namespace (the CRI's) without any registry.
cri_images() {
	local oci=$WORK/cri/oci bundle=$WORK/cri/bundle applet
	umoci init --layout "$oci"
	umoci new --image "$oci:base"
	umoci unpack --image "$oci:base" "$bundle"
	mkdir -p "$bundle/rootfs/bin"
	cp /bin/busybox "$bundle/rootfs/bin/busybox"
	for applet in sh sleep cat; do ln -s busybox "$bundle/rootfs/bin/$applet"; done
	umoci repack --image "$oci:base" "$bundle"
	umoci config --image "$oci:base" --tag pause --config.entrypoint /bin/sleep --config.cmd 2147483647
	umoci config --image "$oci:base" --tag app --config.cmd /bin/sh
	umoci rm --image "$oci:base"
	tar -C "$oci" -cf "$WORK/cri/images.tar" .
	ctr --address "$WORK/cri/containerd.sock" --namespace k8s.io images import --snapshotter native \
		--base-name localhost/icni-conformance/busybox "$WORK/cri/images.tar"
	local list
	list=$(ctr --address "$WORK/cri/containerd.sock" --namespace k8s.io images list -q)
	grep -qxF "$CRI_PAUSE" <<<"$list" && grep -qxF "$CRI_APP" <<<"$list"
}

# The node before the mesh: a primary network (bridge + host-local, dual stack) and the
# reference plugins; intercept-cni not chained yet.
cri_network() {
	local d=$WORK/cri
	mkdir -p "$d/net.d" "$d/bin" "$d/ipam"
	# containerd's CRI also sets up the pod's loopback with the reference plugin.
	ln -s "$REFERENCE_PLUGINS/bridge" "$REFERENCE_PLUGINS/host-local" "$REFERENCE_PLUGINS/loopback" "$d/bin/"
	ip link add "$CRI_BRIDGE" type bridge
	ip addr add "$CRI_GW4/24" dev "$CRI_BRIDGE"
	ip addr add "$CRI_GW6/64" dev "$CRI_BRIDGE" nodad
	ip link set "$CRI_BRIDGE" up
	cat >"$d/net.d/10-$CRI_NETWORK.conflist" <<-EOF
		{
		  "cniVersion": "1.0.0",
		  "name": "$CRI_NETWORK",
		  "plugins": [
		    {
		      "type": "bridge",
		      "bridge": "$CRI_BRIDGE",
		      "isGateway": false,
		      "ipMasq": false,
		      "ipam": {
		        "type": "host-local",
		        "dataDir": "$d/ipam",
		        "ranges": [[{"subnet": "$CRI_SUBNET4", "gateway": "$CRI_GW4"}],
		                   [{"subnet": "$CRI_SUBNET6", "gateway": "$CRI_GW6"}]]
		      }
		    }
		  ]
		}
	EOF
	# The operator's config: the plugin's defaults, one excluded namespace, logs under WORK.
	cat >"$d/plugin.json" <<-EOF
		{"excludeNamespaces": ["$CRI_EXCLUDED_NS"], "stateDir": "$d/plugin-state",
		 "logFile": "$d/plugin.log", "logLevel": "debug"}
	EOF
}

cri_chain() {
	"$PLUGIN" install --cni-conf-dir "$WORK/cri/net.d" --cni-bin-dir "$WORK/cri/bin" \
		--plugin-config "$WORK/cri/plugin.json" || return 1
	# The installer copies only the plugin; the node tool goes next to it (intercept-cni audit).
	cp "$NODE_TOOL" "$WORK/cri/bin/intercept-cni-node"
	# containerd reloads its CNI config on the conf dir's inotify events.
	sleep 1
	grep -q intercept-cni "$WORK/cri/net.d/10-$CRI_NETWORK.conflist"
}

# cri_pod NAMESPACE NAME ANNOTATIONS_JSON: a pod as kubelet starts it; its sandbox id, netns
# path and addresses land in WORK/cri/pods/NAME.{id,netns,ip4,ip6}.
cri_pod() {
	local ns=$1 name=$2 annotations=$3 p=$WORK/cri/pods/$2
	mkdir -p "$WORK/cri/pods"
	cri run-pod "$ns" "$name" "uid-$name" "$annotations" "$CRI_APP" >"$p.id" || return 1
	cri status "$(cat "$p.id")" >"$p.status" || return 1
	python3 - "$p" <<-'EOF'
		import json, sys
		p = sys.argv[1]
		s = json.load(open(p + ".status"))
		assert s["netns"] and s["pid"], s
		open(p + ".netns", "w").write(s["netns"])
		for ip in s["ips"]:
		    open(p + (".ip6" if ":" in ip else ".ip4"), "w").write(ip)
		assert any(":" not in ip for ip in s["ips"]) and any(":" in ip for ip in s["ips"]), s["ips"]
	EOF
	# A second link to the pod netns, so its rules can still be read after StopPodSandbox.
	touch "$p.hold"
	mount --bind "$(cat "$p.netns")" "$p.hold"
	stat -L -c %i "$p.hold" >>"$WORK/netns-inodes"
}

pod_field() { cat "$WORK/cri/pods/$1.$2" 2>/dev/null; }

# in_pod NAME COMMAND...: in the pod's netns (through the suite's own link to it).
in_pod() {
	local pod=$1
	shift
	nsenter --net="$WORK/cri/pods/$pod.hold" "$@"
}

cri_rules() { in_pod "$1" nft list table inet intercept-cni >/dev/null 2>&1; }
cri_no_rules() {
	if in_pod "$1" nft list ruleset | grep -q intercept; then
		in_pod "$1" nft list ruleset
		return 1
	fi
}

# as_uid POD UID ORIGDST_ARGS...: origdst.py in the pod netns as UID (the script comes on stdin:
# UID may not read the suite's files; it writes its ready file in WORK/cri/ready).
as_uid() {
	local pod=$1 uid=$2
	shift 2
	in_pod "$pod" setpriv --reuid "$uid" --regid "$uid" --clear-groups /usr/bin/python3 - "$@" <"$HERE/origdst.py"
}

# proxied POD UID LISTEN_ADDR PORT CLIENT TARGET: a stand-in proxy listening as UID on PORT
# inside POD receives the connection CLIENT ("pod", or "host" for the node) makes to
# TARGET:8080, with SO_ORIGINAL_DST intact.
proxied() {
	local pod=$1 uid=$2 listen=$3 port=$4 client=$5 target=$6 ready expected got
	ready=$WORK/cri/ready/$pod
	expected="$target:$PROBE_PORT"
	[[ $target == *:* ]] && expected="[$target]:$PROBE_PORT"
	rm -f "$ready"
	as_uid "$pod" "$uid" listen "$listen" "$port" "$ready" 5 >"$WORK/cri/pods/$pod.got" &
	local listener=$!
	for _ in $(seq 50); do [[ -e $ready ]] && break; sleep 0.1; done
	local connect=(python3 "$HERE/origdst.py" connect "$target" "$PROBE_PORT" 3)
	[[ $client == pod ]] && connect=(in_pod "$pod" "${connect[@]}")
	if ! "${connect[@]}"; then
		kill "$listener" 2>/dev/null
		wait "$listener" 2>/dev/null
		echo "not redirected"
		return 1
	fi
	wait "$listener" || { echo "the proxy on $port received nothing"; return 1; }
	got=$(cat "$WORK/cri/pods/$pod.got")
	[[ $got == "$expected" ]] || { echo "original destination $got, want $expected"; return 1; }
}

# The proxy's own outbound connections are not redirected: nothing listens on 8080, so the
# connection made as the proxy UID must fail while a listener waits on the outbound port.
proxy_uid_bypasses() {
	local pod=$1 uid=$2 port=$3 ready=$WORK/cri/ready/$1
	rm -f "$ready"
	in_pod "$pod" python3 "$HERE/origdst.py" listen 127.0.0.1 "$port" "$ready" 3 >/dev/null &
	local listener=$!
	for _ in $(seq 50); do [[ -e $ready ]] && break; sleep 0.1; done
	local rc=0 err
	err=$(as_uid "$pod" "$uid" connect "$CRI_GW4" "$PROBE_PORT" 2 2>&1) || rc=$?
	kill "$listener" 2>/dev/null
	wait "$listener" 2>/dev/null
	[[ $rc != 0 ]] || { echo "the proxy UID's connection was redirected"; return 1; }
	# Refused by the bridge address itself: it went out, unredirected.
	grep -q "Connection refused" <<<"$err" || { echo "$err"; return 1; }
}

# not_intercepted POD: no rules, and a connection to 8080 is not redirected to a listener.
not_intercepted() {
	cri_no_rules "$1" || return 1
	if proxied "$1" 0 0.0.0.0 "$ISTIO_OUT" pod "$CRI_GW4" >/dev/null 2>&1; then
		echo "redirected"
		return 1
	fi
}

# plugin_logged VERB SANDBOX_ID OUTCOME: the plugin's own log line for the call.
plugin_logged() {
	grep -E "$1 .*container=$2 .*outcome=$3" "$WORK/cri/plugin.log" >/dev/null ||
		{ echo "no '$1 ... outcome=$3' line for $2 in the plugin log"; tail -n 5 "$WORK/cri/plugin.log"; return 1; }
}

cri_stop() { cri stop "$(pod_field "$1" id)"; }
cri_remove() { cri remove "$(pod_field "$1" id)"; }

# stopped_clean POD: StopPodSandbox ran DEL (logged ok) and the rules are gone from the netns.
stopped_clean() {
	plugin_logged DEL "$(pod_field "$1" id)" ok && cri_no_rules "$1"
}

cri_release() {
	local p=$WORK/cri/pods/$1
	umount "$p.hold" 2>/dev/null || true
}

cri_istio_case() {
	cri_pod default istio-v "$ISTIO_DS_ANNOTATIONS" >"$WORK/case.out" 2>&1 &&
		pass cri "istio-injected dual-stack pod: RunPodSandbox + CreateContainer + StartContainer" ||
		{ fail cri "istio-injected dual-stack pod: RunPodSandbox + CreateContainer + StartContainer" "$WORK/case.out"; return 0; }
	local ip4 ip6
	ip4=$(pod_field istio-v ip4)
	ip6=$(pod_field istio-v ip6)
	check cri "istio pod: outbound IPv4 to $CRI_GW4:$PROBE_PORT reaches the proxy (uid $ISTIO_UID) on $ISTIO_OUT, SO_ORIGINAL_DST intact" \
		proxied istio-v "$ISTIO_UID" 127.0.0.1 "$ISTIO_OUT" pod "$CRI_GW4"
	check cri "istio pod: outbound IPv6 to [$CRI_GW6]:$PROBE_PORT reaches the proxy on $ISTIO_OUT" \
		proxied istio-v "$ISTIO_UID" ::1 "$ISTIO_OUT" pod "$CRI_GW6"
	check cri "istio pod: inbound IPv4 from the node to $ip4:$PROBE_PORT reaches the proxy on $ISTIO_IN" \
		proxied istio-v "$ISTIO_UID" 0.0.0.0 "$ISTIO_IN" host "$ip4"
	check cri "istio pod: inbound IPv6 from the node to [$ip6]:$PROBE_PORT reaches the proxy on $ISTIO_IN" \
		proxied istio-v "$ISTIO_UID" :: "$ISTIO_IN" host "$ip6"
	check cri "istio pod: the proxy UID's own outbound connection is not redirected" \
		proxy_uid_bypasses istio-v "$ISTIO_UID" "$ISTIO_OUT"
	check cri "istio pod: StopPodSandbox runs DEL, which removes the rules" \
		eval 'cri_stop istio-v && stopped_clean istio-v'
	check cri "istio pod: a second StopPodSandbox is harmless" cri_stop istio-v
	check cri "istio pod: RemovePodSandbox" cri_remove istio-v
	cri_release istio-v
}

# Without a dual-stack proxy, istio-cni programs IPv4 only: the pod's IPv6 is left alone.
cri_ipv4_only_case() {
	check cri "istio pod without dual stack starts" cri_pod default istio-v4 "$ISTIO_ANNOTATIONS"
	[[ -n $CASE_OK ]] || return 0
	check cri "istio pod without dual stack: outbound IPv4 reaches the proxy on $ISTIO_OUT" \
		proxied istio-v4 "$ISTIO_UID" 127.0.0.1 "$ISTIO_OUT" pod "$CRI_GW4"
	check cri "istio pod without dual stack: outbound IPv6 is not redirected" \
		expect_failure proxied istio-v4 "$ISTIO_UID" ::1 "$ISTIO_OUT" pod "$CRI_GW6"
	cri_stop istio-v4 >/dev/null 2>&1 && cri_remove istio-v4 >/dev/null 2>&1
	cri_release istio-v4
}

cri_linkerd_case() {
	check cri "linkerd-injected pod starts" cri_pod default linkerd-v "$LINKERD_ANNOTATIONS"
	[[ -n $CASE_OK ]] || return 0
	check cri "linkerd pod: outbound to $CRI_GW4:$PROBE_PORT reaches the proxy (uid $LINKERD_UID) on $LINKERD_OUT" \
		proxied linkerd-v "$LINKERD_UID" 127.0.0.1 "$LINKERD_OUT" pod "$CRI_GW4"
	check cri "linkerd pod: inbound from the node to $(pod_field linkerd-v ip4):$PROBE_PORT reaches the proxy on $LINKERD_IN" \
		proxied linkerd-v "$LINKERD_UID" 0.0.0.0 "$LINKERD_IN" host "$(pod_field linkerd-v ip4)"
	check cri "linkerd pod: the proxy UID's own outbound connection is not redirected" \
		proxy_uid_bypasses linkerd-v "$LINKERD_UID" "$LINKERD_OUT"
	cri_stop linkerd-v >/dev/null 2>&1 && cri_remove linkerd-v >/dev/null 2>&1
	cri_release linkerd-v
}

# cri_selection_case TAG NAMESPACE ANNOTATIONS EXPECT(intercepted|untouched)
cri_selection_case() {
	local tag=$1 ns=$2 annotations=$3 expect=$4 name
	name=sel-$((++POD_SEQ))
	check cri "$tag: pod starts" cri_pod "$ns" "$name" "$annotations"
	[[ -n $CASE_OK ]] || return 0
	if [[ $expect == intercepted ]]; then
		check cri "$tag: intercepted (outbound reaches the proxy on $ISTIO_OUT)" \
			proxied "$name" "$ISTIO_UID" 127.0.0.1 "$ISTIO_OUT" pod "$CRI_GW4"
	else
		check cri "$tag: untouched (no rules, no redirection)" not_intercepted "$name"
	fi
	cri_stop "$name" >/dev/null 2>&1 && cri_remove "$name" >/dev/null 2>&1
	cri_release "$name"
}

# containerd goes away and comes back while the pod runs: the rules stay, DEL still works.
cri_restart_case() {
	check cri "restart: istio pod starts" cri_pod default restart-v "$ISTIO_ANNOTATIONS"
	[[ -n $CASE_OK ]] || return 0
	cri_stop_containerd
	check cri "restart: containerd restarted (same root, state, socket)" cri_start_containerd
	[[ -n $CASE_OK ]] || return 0
	check cri "restart: the pod's rules survived, outbound still reaches the proxy" \
		proxied restart-v "$ISTIO_UID" 127.0.0.1 "$ISTIO_OUT" pod "$CRI_GW4"
	check cri "restart: StopPodSandbox after the restart runs DEL, which removes the rules" \
		eval 'cri_stop restart-v && stopped_clean restart-v'
	cri_remove restart-v >/dev/null 2>&1
	cri_release restart-v
}

# Hostile annotations on a selected pod: ADD refuses with code 7 before touching the kernel,
# and the runtime fails RunPodSandbox (and cleans up its own side).
cri_hostile_case() {
	local annotations veths_before
	annotations=$(python3 -c 'import json, sys
a = json.loads(sys.argv[1])
a["traffic.sidecar.istio.io/excludeOutboundPorts"] = "1-2-3; nft flush ruleset"
a["traffic.sidecar.istio.io/includeOutboundIPRanges"] = "10.0.0.0/33\n-A OUTPUT -j ACCEPT"
print(json.dumps(a))' "$ISTIO_ANNOTATIONS")
	veths_before=$(ip -o link show master "$CRI_BRIDGE" | wc -l)
	check cri "hostile annotations: RunPodSandbox fails" \
		expect_failure cri run-pod default hostile "uid-hostile" "$annotations" "$CRI_APP"
	check cri "hostile annotations: the plugin refused ADD with code 7" \
		eval 'grep -E "ADD pod=default/hostile .*outcome=error 7:" "$WORK/cri/plugin.log"'
	check cri "hostile annotations: nothing left (no sandbox ready, no veth, no address held)" \
		cri_hostile_nothing_left "$veths_before"
}

cri_hostile_nothing_left() {
	local veths
	veths=$(ip -o link show master "$CRI_BRIDGE" | wc -l)
	[[ $veths == "$1" ]] || { echo "veths on the bridge: $veths, before: $1"; return 1; }
	if grep -rqs hostile "$WORK/cri/ipam"; then echo "address still held"; return 1; fi
	if compgen -G "$WORK/cri/plugin-state/*" >/dev/null && grep -rqs hostile "$WORK/cri/plugin-state"; then
		echo "plugin state left"; return 1
	fi
}

cri_parallel_case() {
	local i pids=() failed=0
	for i in $(seq "$PARALLEL_PODS"); do
		cri_pod default "par-$i" "$ISTIO_ANNOTATIONS" >"$WORK/cri/par-$i.out" 2>&1 &
		pids+=($!)
	done
	for i in "${!pids[@]}"; do wait "${pids[$i]}" || { failed=1; cat "$WORK/cri/par-$((i + 1)).out"; }; done >"$WORK/case.out"
	if [[ $failed == 0 ]]; then
		pass cri "$PARALLEL_PODS istio pods started in parallel"
	else
		fail cri "$PARALLEL_PODS istio pods started in parallel" "$WORK/case.out"
	fi
	check cri "$PARALLEL_PODS parallel pods: every one intercepted (live outbound traffic to its proxy)" \
		cri_parallel_all_intercepted
	pids=()
	for i in $(seq "$PARALLEL_PODS"); do
		{ cri_stop "par-$i" && cri_remove "par-$i"; } >"$WORK/cri/par-$i.out" 2>&1 &
		pids+=($!)
	done
	# (Only these jobs: a bare wait would wait for containerd too.)
	wait "${pids[@]}" || true
	check cri "$PARALLEL_PODS parallel pods: all stopped and removed, DEL removed every rule, nothing left" \
		cri_parallel_nothing_left
	for i in $(seq "$PARALLEL_PODS"); do cri_release "par-$i"; done
}

cri_parallel_all_intercepted() {
	local i bad=0
	for i in $(seq "$PARALLEL_PODS"); do
		proxied "par-$i" "$ISTIO_UID" 127.0.0.1 "$ISTIO_OUT" pod "$CRI_GW4" || { echo "par-$i"; bad=1; }
	done
	[[ $bad == 0 ]]
}

cri_parallel_nothing_left() {
	local i bad=0 id
	for i in $(seq "$PARALLEL_PODS"); do
		id=$(pod_field "par-$i" id)
		stopped_clean "par-$i" || bad=1
		if [[ -e $(pod_field "par-$i" netns) ]]; then echo "par-$i: netns file left"; bad=1; fi
		if grep -rqs -- "$id" "$WORK/cri/ipam"; then echo "par-$i: address still held"; bad=1; fi
	done
	if [[ -n $(ip -o link show master "$CRI_BRIDGE") ]]; then echo "ports left on $CRI_BRIDGE"; bad=1; fi
	[[ $bad == 0 ]]
}

# Pods that started before the plugin was chained: audit finds them, --repair intercepts them
# in place. AUDIT_JSON holds the last report.
audit() {
	"$WORK/cri/bin/intercept-cni" audit --cri-socket "$WORK/cri/containerd.sock" \
		--cni-conf-dir "$WORK/cri/net.d" "$@"
}

audit_reports() {
	local want_rc=$1 pod=$2 status=$3 rc=0
	shift 3
	audit --json "$@" >"$WORK/cri/audit.json" || rc=$?
	[[ $rc == "$want_rc" ]] || { cat "$WORK/cri/audit.json"; echo "audit exit status $rc, want $want_rc"; return 1; }
	python3 - "$WORK/cri/audit.json" "$(pod_field "$pod" id)" "$status" <<-'EOF'
		import json, sys
		doc = json.load(open(sys.argv[1]))
		pods = {p["id"]: p for p in doc["pods"]}
		got = pods.get(sys.argv[2], {}).get("status")
		assert got == sys.argv[3], "status %r, want %r: %s" % (got, sys.argv[3], json.dumps(doc, indent=1))
	EOF
}

audit_text_names() {
	local out
	out=$(audit 2>/dev/null) || true
	grep -E "^$2 +default/$1 sandbox=" <<<"$out" || { echo "$out"; return 1; }
}

cri_audit_case() {
	check audit "before chaining: an istio-injected pod and a plain pod start unintercepted" \
		eval 'cri_pod default early-istio "$ISTIO_ANNOTATIONS" && cri_pod default early-plain "{}" && cri_no_rules early-istio'
	[[ -n $CASE_OK ]] || return 0
	check audit "intercept-cni install chains the plugin into the runtime's conf dir" cri_chain
	[[ -n $CASE_OK ]] || return 0
	check audit "audit --json reports the istio pod missing (exit 1), touching nothing" \
		eval 'audit_reports 1 early-istio missing && cri_no_rules early-istio'
	check audit "audit reports the plain pod not selected" audit_reports 1 early-plain not-selected
	check audit "audit text report names the pod" audit_text_names early-istio missing
	check audit "audit --repair intercepts it in place (exit 0, reported repaired)" \
		audit_reports 0 early-istio repaired --repair
	check audit "repaired pod: outbound reaches the proxy on $ISTIO_OUT, SO_ORIGINAL_DST intact (no restart)" \
		proxied early-istio "$ISTIO_UID" 127.0.0.1 "$ISTIO_OUT" pod "$CRI_GW4"
	check audit "repaired pod: inbound IPv4 reaches the proxy on $ISTIO_IN" \
		proxied early-istio "$ISTIO_UID" 0.0.0.0 "$ISTIO_IN" host "$(pod_field early-istio ip4)"
	check audit "plain pod left untouched by --repair" not_intercepted early-plain
	check audit "audit again: the pod is intercepted, nothing to report (exit 0)" \
		audit_reports 0 early-istio intercepted
	in_pod early-istio nft flush chain inet intercept-cni output || true
	check audit "drift (the outbound chain emptied) is reported drifted" audit_reports 1 early-istio drifted
	in_pod early-istio nft flush ruleset || true
	check audit "rules flushed: reported missing again" audit_reports 1 early-istio missing
	in_pod early-plain nft add table inet intercept-cni || true
	check audit "rules on a pod the policy leaves alone are reported, not removed" \
		eval 'audit_reports 1 early-plain unexpected && cri_rules early-plain'
	in_pod early-plain nft delete table inet intercept-cni || true
	check audit "repaired pod: StopPodSandbox's DEL removes the rules" \
		eval 'cri_stop early-istio && stopped_clean early-istio'
	for pod in early-istio early-plain; do
		cri_stop "$pod" >/dev/null 2>&1
		cri_remove "$pod" >/dev/null 2>&1
		cri_release "$pod"
	done
	check audit "a netns path outside the runtime's netns dir is never entered" audit_refuses_unproven
}

# The netns dir is narrowed to one where no pod lives: every pod is unproven, none entered.
audit_refuses_unproven() {
	local rc=0 name
	name=unproven-$((++POD_SEQ))
	cri_pod default "$name" "$ISTIO_ANNOTATIONS" >/dev/null || return 1
	in_pod "$name" nft flush ruleset || true
	audit --json --repair --netns-dir "$WORK/cri" >"$WORK/cri/audit.json" || rc=$?
	[[ $rc == 1 ]] || { echo "audit exit status $rc, want 1 (an unproven pod needs attention)"; return 1; }
	local out
	out=$(python3 - "$WORK/cri/audit.json" "$(pod_field "$name" id)" <<-'EOF'
		import json, sys
		pods = {p["id"]: p for p in json.load(open(sys.argv[1]))["pods"]}
		p = pods[sys.argv[2]]
		assert p["status"] == "unproven" and "not proven" in p["detail"], p
	EOF
	) || { echo "$out"; cat "$WORK/cri/audit.json"; return 1; }
	cri_no_rules "$name" || return 1
	cri_stop "$name" >/dev/null && cri_remove "$name" >/dev/null
	cri_release "$name"
}

# The node agent repairs a pod that started while the plugin was not chained: the plugin is
# uninstalled, an Istio pod starts, then `install --watch --repair-interval 2` chains the plugin
# and runs `audit --repair` (intercept-cni-node next to the agent's executable) at once.
AGENT_PID=
agent_start() {
	local log=$WORK/cri/agent.log
	"$PLUGIN" install --watch --cni-conf-dir "$WORK/cri/net.d" --cni-bin-dir "$WORK/cri/bin" \
		--plugin-config "$WORK/cri/plugin.json" --listen 127.0.0.1:0 --events-socket "" \
		--repair-interval 2 --cri-socket "$WORK/cri/containerd.sock" >/dev/null 2>"$log" &
	AGENT_PID=$!
	for _ in $(seq 50); do
		AGENT_ADDR=$(sed -n 's/.*\/metrics on //p' "$log")
		[[ -n $AGENT_ADDR ]] && return 0
		sleep 0.1
	done
	cat "$log"
	return 1
}

# agent_metric SAMPLE: the value of one sample (with its labels) on the agent's /metrics.
agent_metric() {
	python3 - "http://$AGENT_ADDR/metrics" "$1" <<-'EOF'
		import sys, urllib.request
		body = urllib.request.urlopen(sys.argv[1], timeout=3).read().decode()
		print(next((l.split()[-1] for l in body.splitlines() if l.startswith(sys.argv[2] + " ")), 0))
	EOF
}

# The pod is intercepted, and the agent counted it repaired by a clean audit, within 20 s.
agent_repaired() {
	for _ in $(seq 100); do
		if (($(agent_metric intercept_cni_pods_repaired_total) >= 1)) &&
			(($(agent_metric 'intercept_cni_audit_runs_total{result="clean"}') >= 1)) && cri_rules "$1"; then
			grep -E "audit: repaired default/$1" "$WORK/cri/agent.log" >/dev/null || { cat "$WORK/cri/agent.log"; return 1; }
			return 0
		fi
		sleep 0.2
	done
	cat "$WORK/cri/agent.log"
	curl -s "http://$AGENT_ADDR/metrics" 2>/dev/null | grep audit
	return 1
}

agent_stop() {
	kill -TERM "$AGENT_PID" && wait "$AGENT_PID"
	AGENT_PID=
	grep -q intercept-cni "$WORK/cri/net.d/10-$CRI_NETWORK.conflist"
}

cri_agent_repair_case() {
	check agent "plugin uninstalled: an istio-injected pod starts unintercepted" \
		eval '"$PLUGIN" uninstall --cni-conf-dir "$WORK/cri/net.d" --cni-bin-dir "$WORK/cri/bin" &&
			sleep 1 && cri_pod default late-istio "$ISTIO_ANNOTATIONS" && cri_no_rules late-istio'
	[[ -n $CASE_OK ]] || return 0
	check agent "install --watch --repair-interval 2 chains the plugin and repairs the running pod in place (metrics: repaired, clean audit)" \
		eval 'agent_start && agent_repaired late-istio'
	check agent "agent-repaired pod: outbound reaches the proxy on $ISTIO_OUT, SO_ORIGINAL_DST intact (no restart)" \
		proxied late-istio "$ISTIO_UID" 127.0.0.1 "$ISTIO_OUT" pod "$CRI_GW4"
	if [[ -n $AGENT_PID ]]; then
		check agent "agent stopped with SIGTERM: the entry stays chained" agent_stop
	fi
	cri_stop late-istio >/dev/null 2>&1
	cri_remove late-istio >/dev/null 2>&1
	cri_release late-istio
}

run_cri() {
	mkdir -p "$WORK/cri"
	# The stand-in proxies run as the meshes' proxy UIDs: they may pass through WORK (not list
	# it) to drop their ready files in a directory of their own.
	chmod 0711 "$WORK" "$WORK/cri"
	install -d -m 1733 "$WORK/cri/ready"
	CRI_PAUSE=localhost/icni-conformance/busybox:pause
	CRI_APP=localhost/icni-conformance/busybox:app
	cri_network
	cri_containerd_config
	check cri "private containerd with its CRI plugin starts (own root, state, socket, CNI dirs)" cri_start_containerd
	[[ -n $CASE_OK ]] || return 0
	check cri "pause and app images built with umoci and imported into k8s.io" cri_images
	[[ -n $CASE_OK ]] || return 0
	cri_audit_case
	cri_agent_repair_case
	grep -q intercept-cni "$WORK/cri/net.d/10-$CRI_NETWORK.conflist" 2>/dev/null || cri_chain >/dev/null 2>&1 || true
	cri_istio_case
	cri_linkerd_case
	cri_selection_case "no annotations, default podSelection annotated" default '{}' untouched
	cri_selection_case "istio opt-out (sidecar.istio.io/inject: false)" default \
		"$(python3 -c 'import json,sys; a=json.loads(sys.argv[1]); a["sidecar.istio.io/inject"]="false"; print(json.dumps(a))' "$ISTIO_ANNOTATIONS")" untouched
	cri_ipv4_only_case
	cri_selection_case "istio pod injected with istio-init (it programs itself): left to it" default \
		"$(python3 -c 'import json,sys; a=json.loads(sys.argv[1]); a["sidecar.istio.io/status"]=a["sidecar.istio.io/status"].replace("istio-validation","istio-init"); print(json.dumps(a))' "$ISTIO_ANNOTATIONS")" untouched
	cri_selection_case "opt-in (intercept-cni.io/enabled: true)" default '{"intercept-cni.io/enabled": "true"}' intercepted
	cri_selection_case "istio pod in excluded namespace $CRI_EXCLUDED_NS" "$CRI_EXCLUDED_NS" "$ISTIO_ANNOTATIONS" untouched
	cri_restart_case
	cri_hostile_case
	cri_parallel_case
}

# Cleanup: every sandbox stopped and removed through the CRI (its DELs run), containerd and
# its shims ended, the bridge deleted.
cri_cleanup() {
	local netns
	[[ -n $AGENT_PID ]] && kill "$AGENT_PID" 2>/dev/null
	[[ -S $WORK/cri/containerd.sock ]] && "$CRI_DRIVER" "$WORK/cri/containerd.sock" clear >"$WORK/cri/left-netns" 2>/dev/null
	cri_stop_containerd
	# The netns of sandboxes whose teardown failed (their paths, printed by clear).
	while read -r netns; do
		[[ -e $netns ]] && { umount "$netns" 2>/dev/null; rm -f "$netns"; }
	done <"$WORK/cri/left-netns" 2>/dev/null
	grep -l -F -- "$WORK/cri/containerd.sock" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3 | while read -r pid; do
		[[ $(cat "/proc/$pid/comm" 2>/dev/null) == containerd-shim* ]] && kill "$pid" 2>/dev/null
	done
	ip link delete "$CRI_BRIDGE" 2>/dev/null
	true
}
