// ferry-hostpath-csi: a small single-node CSI driver for Ferry's e2e cluster, run as a host process.
//
// It stands in for kubernetes-csi/csi-driver-host-path + node-driver-registrar, which the Go module
// proxy reachable here does not serve. It implements the CSI calls that the upstream external-provisioner,
// csi-snapshotter and the kubelet use:
//   - <statedir> is a btrfs filesystem (e2e/cluster/up: csi_storage), so that snapshots and clones are
//     instant copy-on-write, as a storage system's are in a real cluster, and cost no mover anything;
//   - volumes are btrfs subvolumes <statedir>/volumes/<id>, published into pods with a bind mount;
//   - block volumes are a sparse image <statedir>/volumes/<id>/disk.img, published as a loop device
//     bind-mounted onto the target file;
//   - snapshots are read-only btrfs snapshots <statedir>/snapshots/<id> of the volume's subvolume, with
//     their metadata in <statedir>/snapshots/<id>.json;
//   - a volume created from a snapshot (or cloned from a volume) is a writable snapshot of it;
//   - it also serves the kubelet plugin-registration socket (what node-driver-registrar does).
//
// IDs derive from the CO-supplied names, which makes Create* idempotent without a state file.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

const version = "0.1.0"

var (
	driverName = flag.String("drivername", "hostpath.csi.k8s.io", "CSI driver name")
	endpoint   = flag.String("endpoint", "/var/lib/kubelet/plugins/csi-hostpath/csi.sock", "CSI socket path (unix:// prefix optional)")
	regDir     = flag.String("plugin-registration-dir", "/var/lib/kubelet/plugins_registry", "kubelet plugin registration dir; empty disables registration")
	nodeID     = flag.String("nodeid", "", "node name")
	stateDir   = flag.String("statedir", "/var/lib/csi-hostpath-data", "where volumes and snapshots live")
)

type driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer
	mu sync.Mutex
}

type snapMeta struct {
	ID        string `json:"id"`
	Name      string `json:"name"`
	Source    string `json:"source"`
	Size      int64  `json:"size"`
	CreatedNs int64  `json:"createdNs"`
}

func idFor(prefix, name string) string {
	h := sha256.Sum256([]byte(name))
	return prefix + hex.EncodeToString(h[:12])
}

func volDir(id string) string    { return filepath.Join(*stateDir, "volumes", id) }
func snapDir(id string) string   { return filepath.Join(*stateDir, "snapshots", id) }
func snapMetaF(id string) string { return filepath.Join(*stateDir, "snapshots", id+".json") }

func diskImg(id string) string { return filepath.Join(volDir(id), "disk.img") }

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

func wantsBlock(caps []*csi.VolumeCapability) bool {
	for _, c := range caps {
		if c.GetBlock() != nil {
			return true
		}
	}
	return false
}

// loopFor returns the loop device backing img, attaching one if there is none.
func loopFor(img string) (string, error) {
	out, err := exec.Command("losetup", "-j", img).Output()
	if err != nil {
		return "", fmt.Errorf("losetup -j %s: %v", img, err)
	}
	if f := strings.SplitN(strings.TrimSpace(string(out)), ":", 2); len(f) == 2 && f[0] != "" {
		return f[0], nil
	}
	out, err = exec.Command("losetup", "-f", "--show", img).Output()
	if err != nil {
		return "", fmt.Errorf("losetup -f --show %s: %v", img, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// detachUnused detaches the loop devices of img that are no longer bind-mounted anywhere.
func detachUnused(img string) {
	out, err := exec.Command("losetup", "-j", img).Output()
	if err != nil {
		return
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		dev := strings.SplitN(line, ":", 2)[0]
		if dev == "" {
			continue
		}
		used := false
		for _, m := range strings.Split(string(mi), "\n") {
			if f := strings.Fields(m); len(f) > 4 && f[3] == "/"+filepath.Base(dev) {
				used = true
			}
		}
		if !used {
			_ = run("losetup", "-d", dev)
			log.Printf("detached %s (%s)", dev, img)
		}
	}
}

func dirSize(p string) int64 {
	var n int64
	_ = filepath.WalkDir(p, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if fi, e := d.Info(); e == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

// removeSubvolume deletes the subvolume at p, if there is one (a plain directory left by an interrupted
// call is removed too).
func removeSubvolume(p string) error {
	if !exists(p) {
		return nil
	}
	if err := run("btrfs", "subvolume", "delete", p); err != nil {
		if e := os.RemoveAll(p); e != nil {
			return fmt.Errorf("%v; %v", err, e)
		}
	}
	return nil
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

// ---- Identity

func (d *driver) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: *driverName, VendorVersion: version}, nil
}

func (d *driver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{Capabilities: []*csi.PluginCapability{
		{Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{Type: csi.PluginCapability_Service_CONTROLLER_SERVICE}}},
	}}, nil
}

func (d *driver) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return &csi.ProbeResponse{}, nil
}

// ---- Controller

func (d *driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, c := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: c}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

func checkCaps(caps []*csi.VolumeCapability) error {
	if len(caps) == 0 {
		return status.Error(codes.InvalidArgument, "volume capabilities missing")
	}
	return nil
}

func (d *driver) CreateVolume(_ context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if req.GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "name missing")
	}
	if err := checkCaps(req.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	id := idFor("vol-", req.GetName())
	dir := volDir(id)
	size := req.GetCapacityRange().GetRequiredBytes()
	src := req.GetVolumeContentSource()
	if !exists(dir) {
		tmp := dir + ".tmp"
		if err := removeSubvolume(tmp); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		var err error
		switch {
		case src.GetSnapshot() != nil:
			sid := src.GetSnapshot().GetSnapshotId()
			if !exists(snapDir(sid)) {
				return nil, status.Errorf(codes.NotFound, "snapshot %s not found", sid)
			}
			err = run("btrfs", "subvolume", "snapshot", snapDir(sid), tmp)
		case src.GetVolume() != nil:
			vid := src.GetVolume().GetVolumeId()
			if !exists(volDir(vid)) {
				return nil, status.Errorf(codes.NotFound, "volume %s not found", vid)
			}
			err = run("btrfs", "subvolume", "snapshot", volDir(vid), tmp)
		default:
			if err = run("btrfs", "subvolume", "create", tmp); err == nil {
				err = os.Chmod(tmp, 0o777)
			}
		}
		if err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		if wantsBlock(req.GetVolumeCapabilities()) {
			// A block volume is one sparse image file; from a snapshot it keeps the snapshot's bytes.
			img := filepath.Join(tmp, "disk.img")
			f, err := os.OpenFile(img, os.O_CREATE|os.O_RDWR, 0o600)
			if err != nil {
				return nil, status.Error(codes.Internal, err.Error())
			}
			fi, _ := f.Stat()
			if fi != nil && fi.Size() < size {
				err = f.Truncate(size)
			}
			f.Close()
			if err != nil {
				return nil, status.Error(codes.Internal, err.Error())
			}
		}
		if err := os.Rename(tmp, dir); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		log.Printf("CreateVolume %s -> %s (source %v, block %v)", req.GetName(), id, src, wantsBlock(req.GetVolumeCapabilities()))
	}
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{VolumeId: id, CapacityBytes: size, ContentSource: src}}, nil
}

func (d *driver) DeleteVolume(_ context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" || strings.Contains(id, "/") {
		return nil, status.Error(codes.InvalidArgument, "bad volume id")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if exists(diskImg(id)) {
		detachUnused(diskImg(id))
	}
	if err := removeSubvolume(volDir(id)); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	log.Printf("DeleteVolume %s", id)
	return &csi.DeleteVolumeResponse{}, nil
}

func (d *driver) ValidateVolumeCapabilities(_ context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	if !exists(volDir(req.GetVolumeId())) {
		return nil, status.Error(codes.NotFound, "no such volume")
	}
	if err := checkCaps(req.GetVolumeCapabilities()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeCapabilities: req.GetVolumeCapabilities()}}, nil
}

func readSnap(id string) (*snapMeta, error) {
	b, err := os.ReadFile(snapMetaF(id))
	if err != nil {
		return nil, err
	}
	var m snapMeta
	return &m, json.Unmarshal(b, &m)
}

func (m *snapMeta) csi() *csi.Snapshot {
	return &csi.Snapshot{SnapshotId: m.ID, SourceVolumeId: m.Source, SizeBytes: m.Size,
		CreationTime: timestamppb.New(time.Unix(0, m.CreatedNs)), ReadyToUse: true}
}

func (d *driver) CreateSnapshot(_ context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	if req.GetName() == "" || req.GetSourceVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "name and source volume required")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	id := idFor("snap-", req.GetName())
	if m, err := readSnap(id); err == nil {
		if m.Source != req.GetSourceVolumeId() {
			return nil, status.Error(codes.AlreadyExists, "snapshot name used for another volume")
		}
		return &csi.CreateSnapshotResponse{Snapshot: m.csi()}, nil
	}
	src := volDir(req.GetSourceVolumeId())
	if !exists(src) {
		return nil, status.Errorf(codes.NotFound, "volume %s not found", req.GetSourceVolumeId())
	}
	if err := os.MkdirAll(filepath.Dir(snapDir(id)), 0o700); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	// The metadata file is written last: a snapshot without it is an interrupted call, made again here.
	if err := removeSubvolume(snapDir(id)); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if err := run("btrfs", "subvolume", "snapshot", "-r", src, snapDir(id)); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	m := &snapMeta{ID: id, Name: req.GetName(), Source: req.GetSourceVolumeId(), Size: dirSize(src), CreatedNs: time.Now().UnixNano()}
	b, _ := json.Marshal(m)
	if err := os.WriteFile(snapMetaF(id), b, 0o600); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	log.Printf("CreateSnapshot %s of %s -> %s", req.GetName(), m.Source, id)
	return &csi.CreateSnapshotResponse{Snapshot: m.csi()}, nil
}

func (d *driver) DeleteSnapshot(_ context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	id := req.GetSnapshotId()
	if id == "" || strings.Contains(id, "/") {
		return nil, status.Error(codes.InvalidArgument, "bad snapshot id")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	// Metadata first: a snapshot whose deletion is interrupted is no longer listed, and a retry finishes it.
	if err := os.Remove(snapMetaF(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if err := removeSubvolume(snapDir(id)); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	log.Printf("DeleteSnapshot %s", id)
	return &csi.DeleteSnapshotResponse{}, nil
}

func (d *driver) ListSnapshots(_ context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	var out []*csi.ListSnapshotsResponse_Entry
	if id := req.GetSnapshotId(); id != "" {
		if m, err := readSnap(id); err == nil {
			out = append(out, &csi.ListSnapshotsResponse_Entry{Snapshot: m.csi()})
		}
		return &csi.ListSnapshotsResponse{Entries: out}, nil
	}
	files, _ := filepath.Glob(filepath.Join(*stateDir, "snapshots", "*.json"))
	for _, f := range files {
		m, err := readSnap(strings.TrimSuffix(filepath.Base(f), ".json"))
		if err != nil || (req.GetSourceVolumeId() != "" && m.Source != req.GetSourceVolumeId()) {
			continue
		}
		out = append(out, &csi.ListSnapshotsResponse_Entry{Snapshot: m.csi()})
	}
	return &csi.ListSnapshotsResponse{Entries: out}, nil
}

// ---- Node

func (d *driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: *nodeID}, nil
}

func (d *driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

func isMountPoint(p string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[4] == p {
			return true
		}
	}
	return false
}

func (d *driver) NodePublishVolume(_ context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	if id == "" || target == "" || req.GetVolumeCapability() == nil {
		return nil, status.Error(codes.InvalidArgument, "volume id, target path and capability required")
	}
	if req.GetVolumeCapability().GetBlock() != nil {
		return d.publishBlock(id, target, req.GetReadonly())
	}
	src := volDir(id)
	if !exists(src) {
		return nil, status.Errorf(codes.NotFound, "volume %s not found", id)
	}
	if err := os.MkdirAll(target, 0o750); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if isMountPoint(target) {
		return &csi.NodePublishVolumeResponse{}, nil
	}
	if err := syscall.Mount(src, target, "", syscall.MS_BIND, ""); err != nil {
		return nil, status.Errorf(codes.Internal, "bind mount %s on %s: %v", src, target, err)
	}
	if req.GetReadonly() {
		if err := syscall.Mount("", target, "", syscall.MS_BIND|syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
			_ = syscall.Unmount(target, 0)
			return nil, status.Errorf(codes.Internal, "remount read-only: %v", err)
		}
	}
	log.Printf("NodePublishVolume %s on %s (ro=%v)", id, target, req.GetReadonly())
	return &csi.NodePublishVolumeResponse{}, nil
}

// publishBlock attaches the volume's image to a loop device and bind-mounts that onto the target file.
func (d *driver) publishBlock(id, target string, ro bool) (*csi.NodePublishVolumeResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	img := diskImg(id)
	if !exists(img) {
		return nil, status.Errorf(codes.NotFound, "block volume %s not found", id)
	}
	if isMountPoint(target) {
		return &csi.NodePublishVolumeResponse{}, nil
	}
	dev, err := loopFor(img)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if f, err := os.OpenFile(target, os.O_CREATE, 0o640); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	} else {
		f.Close()
	}
	if err := syscall.Mount(dev, target, "", syscall.MS_BIND, ""); err != nil {
		return nil, status.Errorf(codes.Internal, "bind mount %s on %s: %v", dev, target, err)
	}
	if ro {
		if err := syscall.Mount("", target, "", syscall.MS_BIND|syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
			_ = syscall.Unmount(target, 0)
			return nil, status.Errorf(codes.Internal, "remount read-only: %v", err)
		}
	}
	log.Printf("NodePublishVolume (block) %s: %s on %s (ro=%v)", id, dev, target, ro)
	return &csi.NodePublishVolumeResponse{}, nil
}

func (d *driver) NodeUnpublishVolume(_ context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	target := req.GetTargetPath()
	if target == "" {
		return nil, status.Error(codes.InvalidArgument, "target path required")
	}
	for isMountPoint(target) {
		if err := syscall.Unmount(target, 0); err != nil {
			return nil, status.Errorf(codes.Internal, "unmount %s: %v", target, err)
		}
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if id := req.GetVolumeId(); id != "" && !strings.Contains(id, "/") && exists(diskImg(id)) {
		d.mu.Lock()
		detachUnused(diskImg(id))
		d.mu.Unlock()
	}
	log.Printf("NodeUnpublishVolume %s from %s", req.GetVolumeId(), target)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// ---- kubelet plugin registration (what node-driver-registrar does)

type registration struct {
	registerapi.UnimplementedRegistrationServer
	endpoint string
}

func (r *registration) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{Type: registerapi.CSIPlugin, Name: *driverName, Endpoint: r.endpoint,
		SupportedVersions: []string{"1.0.0"}}, nil
}

func (r *registration) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	log.Printf("kubelet registration status: registered=%v error=%q", s.PluginRegistered, s.Error)
	return &registerapi.RegistrationStatusResponse{}, nil
}

func listen(path string) net.Listener {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		log.Fatal(err)
	}
	_ = os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		log.Fatalf("listen %s: %v", path, err)
	}
	return l
}

func logCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	resp, err := h(ctx, req)
	if err != nil {
		log.Printf("%s error: %v", info.FullMethod, err)
	}
	return resp, err
}

func main() {
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	if *nodeID == "" {
		log.Fatal("--nodeid is required")
	}
	sock := strings.TrimPrefix(*endpoint, "unix://")
	for _, d := range []string{"volumes", "snapshots"} {
		if err := os.MkdirAll(filepath.Join(*stateDir, d), 0o711); err != nil {
			log.Fatal(err)
		}
	}
	d := &driver{}
	srv := grpc.NewServer(grpc.UnaryInterceptor(logCalls))
	csi.RegisterIdentityServer(srv, d)
	csi.RegisterControllerServer(srv, d)
	csi.RegisterNodeServer(srv, d)
	l := listen(sock)
	go func() { log.Fatal(srv.Serve(l)) }()
	log.Printf("%s %s serving CSI on %s (node %s, state %s)", *driverName, version, sock, *nodeID, *stateDir)

	var reg *grpc.Server
	var regSock string
	if *regDir != "" {
		regSock = filepath.Join(*regDir, *driverName+"-reg.sock")
		reg = grpc.NewServer()
		registerapi.RegisterRegistrationServer(reg, &registration{endpoint: sock})
		rl := listen(regSock)
		go func() { log.Fatal(reg.Serve(rl)) }()
		log.Printf("kubelet registration socket %s", regSock)
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	log.Print("shutting down")
	if reg != nil {
		reg.Stop()
		_ = os.Remove(regSock)
	}
	srv.Stop()
	_ = os.Remove(sock)
}
