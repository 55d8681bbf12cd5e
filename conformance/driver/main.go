// Command driver is the conformance suite's libcni client, shaped like cnitool:
//
//	driver add|check|del|gc|status <network> <netns-path>
//
// Environment: NETCONFPATH (default /etc/cni/net.d), CNI_PATH, CNI_IFNAME (default eth0),
// CAP_ARGS (JSON object), CNI_ARGS (K=V;...), CNI_CONTAINERID (default: derived from the netns
// path, as cnitool does), CNI_CACHE_DIR (libcni's result cache; default /var/lib/cni) and, for
// gc, VALID_ATTACHMENTS (JSON list of {"containerID","ifname"}; unset means none is valid).
//
// ADD, CHECK and DEL go through libcni's *NetworkList calls, result cache included. libcni
// 1.1.2 (Debian 12) predates GC and STATUS, so those verbs do what later libcni releases do:
// GC first deletes cached attachments that are no longer valid, then both verbs invoke every
// plugin of the list that supports spec 1.1.0, with the config injected at 1.1.0; plugins that
// do not (the reference plugins of Debian 12) are skipped with a note on stderr.
//
// On failure the message goes to stderr and the exit status is the CNI error code when the
// plugin returned one (else 1), so callers can assert on codes.
package main

import (
	"context"
	"crypto/sha512"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
)

// gcVersion is the first spec version with GC and STATUS.
const gcVersion = "1.1.0"

// attachment is one element of cni.dev/valid-attachments.
type attachment struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifname"`
}

// cachedAttachment is the part of a libcni 1.1.2 result-cache file that GC needs.
type cachedAttachment struct {
	Kind           string                 `json:"kind"`
	ContainerID    string                 `json:"containerId"`
	IfName         string                 `json:"ifName"`
	NetworkName    string                 `json:"networkName"`
	CniArgs        [][2]string            `json:"cniArgs,omitempty"`
	CapabilityArgs map[string]interface{} `json:"capabilityArgs,omitempty"`
}

func main() {
	if len(os.Args) != 4 {
		usage()
	}
	verb, network, netnsArg := os.Args[1], os.Args[2], os.Args[3]

	confDir := os.Getenv("NETCONFPATH")
	if confDir == "" {
		confDir = "/etc/cni/net.d"
	}
	list, err := libcni.LoadConfList(confDir, network)
	if err != nil {
		exit(err)
	}
	netns, err := filepath.Abs(netnsArg)
	if err != nil {
		exit(err)
	}
	rt, err := runtimeConf(netns)
	if err != nil {
		exit(err)
	}
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), os.Getenv("CNI_CACHE_DIR"), nil)
	ctx := context.Background()

	switch verb {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			exit(err)
		}
		exit(result.Print())
	case "check":
		exit(cni.CheckNetworkList(ctx, list, rt))
	case "del":
		exit(cni.DelNetworkList(ctx, list, rt))
	case "gc":
		valid, err := validAttachments()
		if err != nil {
			exit(err)
		}
		exit(gc(ctx, cni, list, valid))
	case "status":
		exit(eachNewPlugin(ctx, cni, list, "STATUS", nil))
	default:
		usage()
	}
}

// runtimeConf builds the per-attachment arguments from the environment, like cnitool.
func runtimeConf(netns string) (*libcni.RuntimeConf, error) {
	rt := &libcni.RuntimeConf{NetNS: netns, IfName: "eth0"}
	if ifName, ok := os.LookupEnv("CNI_IFNAME"); ok {
		rt.IfName = ifName
	}
	rt.ContainerID = os.Getenv("CNI_CONTAINERID")
	if rt.ContainerID == "" {
		sum := sha512.Sum512([]byte(netns))
		rt.ContainerID = fmt.Sprintf("cnitool-%x", sum[:10])
	}
	if capArgs := os.Getenv("CAP_ARGS"); capArgs != "" {
		if err := json.Unmarshal([]byte(capArgs), &rt.CapabilityArgs); err != nil {
			return nil, fmt.Errorf("CAP_ARGS: %w", err)
		}
	}
	if cniArgs := os.Getenv("CNI_ARGS"); cniArgs != "" {
		for _, pair := range strings.Split(cniArgs, ";") {
			kv := strings.SplitN(pair, "=", 2)
			if len(kv) != 2 || kv[0] == "" || kv[1] == "" {
				return nil, fmt.Errorf("invalid CNI_ARGS pair %q", pair)
			}
			rt.Args = append(rt.Args, [2]string{kv[0], kv[1]})
		}
	}
	return rt, nil
}

// validAttachments reads VALID_ATTACHMENTS; nil when unset, as cnitool passes no GC args.
func validAttachments() ([]attachment, error) {
	raw, ok := os.LookupEnv("VALID_ATTACHMENTS")
	if !ok {
		return nil, nil
	}
	valid := []attachment{}
	if err := json.Unmarshal([]byte(raw), &valid); err != nil {
		return nil, fmt.Errorf("VALID_ATTACHMENTS: %w", err)
	}
	return valid, nil
}

// gc deletes the cached attachments of this network that are not valid, then asks the plugins
// to collect their own garbage. Errors are collected so one stale attachment cannot hide another.
func gc(ctx context.Context, cni *libcni.CNIConfig, list *libcni.NetworkConfigList, valid []attachment) error {
	keep := map[attachment]bool{}
	for _, a := range valid {
		keep[a] = true
	}
	cached, err := cachedAttachments()
	if err != nil {
		return err
	}
	var errs []string
	for _, c := range cached {
		if c.NetworkName != list.Name || keep[attachment{c.ContainerID, c.IfName}] {
			continue
		}
		// libcni 1.1.2 does not cache the netns; DEL without one is what the spec allows.
		rt := &libcni.RuntimeConf{ContainerID: c.ContainerID, IfName: c.IfName, Args: c.CniArgs, CapabilityArgs: c.CapabilityArgs}
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			errs = append(errs, fmt.Sprintf("delete stale attachment %s/%s: %v", c.ContainerID, c.IfName, err))
		}
	}
	var inject map[string]interface{}
	if valid != nil {
		inject = map[string]interface{}{"cni.dev/valid-attachments": valid}
	}
	if err := eachNewPlugin(ctx, cni, list, "GC", inject); err != nil {
		errs = append(errs, err.Error())
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

// cachedAttachments lists libcni's result cache (<cache dir>/results/<net>-<id>-<ifname>).
func cachedAttachments() ([]cachedAttachment, error) {
	dir := os.Getenv("CNI_CACHE_DIR")
	if dir == "" {
		dir = libcni.CacheDir
	}
	files, err := filepath.Glob(filepath.Join(dir, "results", "*"))
	if err != nil {
		return nil, err
	}
	var out []cachedAttachment
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		var c cachedAttachment
		if err := json.Unmarshal(data, &c); err != nil {
			return nil, fmt.Errorf("cache file %s: %w", f, err)
		}
		if c.Kind == libcni.CNICacheV1 {
			out = append(out, c)
		}
	}
	return out, nil
}

// eachNewPlugin runs a GC or STATUS command on every plugin of the list that supports spec
// 1.1.0, with name, cniVersion and extra keys injected as libcni does. STATUS stops at the first
// failure so its error code reaches the caller unchanged; GC collects.
func eachNewPlugin(ctx context.Context, cni *libcni.CNIConfig, list *libcni.NetworkConfigList, command string, extra map[string]interface{}) error {
	inject := map[string]interface{}{"name": list.Name, "cniVersion": gcVersion}
	for k, v := range extra {
		inject[k] = v
	}
	var errs []string
	for _, plugin := range list.Plugins {
		pluginType := plugin.Network.Type
		info, err := cni.GetVersionInfo(ctx, pluginType)
		if err != nil {
			return fmt.Errorf("plugin %s: VERSION: %w", pluginType, err)
		}
		if !supports(info.SupportedVersions(), gcVersion) {
			fmt.Fprintf(os.Stderr, "driver: %s: plugin %s does not support spec %s, skipped\n", command, pluginType, gcVersion)
			continue
		}
		conf, err := libcni.InjectConf(plugin, inject)
		if err != nil {
			return err
		}
		path, err := invoke.FindInPath(pluginType, cni.Path)
		if err != nil {
			return err
		}
		args := &invoke.Args{Command: command, Path: strings.Join(cni.Path, string(os.PathListSeparator))}
		if err := invoke.ExecPluginWithoutResult(ctx, path, conf.Bytes, args, nil); err != nil {
			if command == "STATUS" {
				return err
			}
			errs = append(errs, fmt.Sprintf("plugin %s: %v", pluginType, err))
		}
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

func supports(versions []string, want string) bool {
	for _, v := range versions {
		if v == want {
			return true
		}
	}
	return false
}

func usage() {
	exe := filepath.Base(os.Args[0])
	fmt.Fprintf(os.Stderr, "usage: %s add|check|del|gc|status <network> <netns-path>\n", exe)
	os.Exit(2)
}

// exit reports err on stderr and exits with its CNI error code, or 1 for other errors.
func exit(err error) {
	if err == nil {
		os.Exit(0)
	}
	fmt.Fprintf(os.Stderr, "driver: %v\n", err)
	var cniErr *types.Error
	if errors.As(err, &cniErr) && cniErr.Code > 0 && cniErr.Code < 256 {
		os.Exit(int(cniErr.Code))
	}
	os.Exit(1)
}
