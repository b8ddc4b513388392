package main

// These tests run the server in-process on a temporary unix socket and talk to it as the agent would, against a
// real S3 server (versitygw, started by ./test). They fail when that server is not there.

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log"
	"math/rand/v2"
	"net"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	pb "ferry.dev/examples/tar-datapath/gen/datapathv1"
)

var (
	s3Endpoint string
	credsFile  string
)

func TestMain(m *testing.M) {
	flag.Parse()
	if !testing.Verbose() {
		log.SetOutput(io.Discard) // the server's call log; shown with -v
	}
	s3Endpoint = os.Getenv("FERRY_TEST_S3_ENDPOINT")
	access, secret := os.Getenv("FERRY_TEST_S3_ACCESS"), os.Getenv("FERRY_TEST_S3_SECRET")
	if s3Endpoint == "" || access == "" || secret == "" {
		fmt.Fprintln(os.Stderr, "FERRY_TEST_S3_ENDPOINT, FERRY_TEST_S3_ACCESS and FERRY_TEST_S3_SECRET must name an S3 server: run examples/tar-datapath/test")
		os.Exit(1)
	}
	u, err := url.Parse(s3Endpoint)
	if err == nil {
		var c net.Conn
		if c, err = net.DialTimeout("tcp", u.Host, 5*time.Second); err == nil {
			c.Close()
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "S3 server %s not reachable: %v\n", s3Endpoint, err)
		os.Exit(1)
	}
	dir, err := os.MkdirTemp("", "tar-datapath-test")
	if err != nil {
		panic(err)
	}
	credsFile = filepath.Join(dir, "credentials")
	creds := fmt.Sprintf("[ferry]\naws_access_key_id = %s\naws_secret_access_key = %s\n", access, secret)
	if err := os.WriteFile(credsFile, []byte(creds), 0o600); err != nil {
		panic(err)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// env is a running server, a client of it, and a fresh bucket.
type env struct {
	dp     pb.DataPathClient
	s3     *s3.Client
	bucket string
}

func (e *env) repo(prefix string) *pb.Repository {
	return &pb.Repository{
		Provider: "aws", Bucket: e.bucket, Prefix: prefix, Endpoint: s3Endpoint, Region: "us-east-1",
		PathStyle: true, CredentialsFile: credsFile, Profile: "ferry",
	}
}

func testServer() *Server {
	s := NewServer()
	s.PartSize = 5 << 20
	s.ProgressEvery = 50 * time.Millisecond
	return s
}

func newEnv(t *testing.T, srv *Server) *env {
	t.Helper()
	e := &env{bucket: "tdp-" + randomHex(6)}
	var err error
	if e.s3, err = newS3Client(context.Background(), e.repo("")); err != nil {
		t.Fatal(err)
	}
	if _, err := e.s3.CreateBucket(context.Background(), &s3.CreateBucketInput{Bucket: aws.String(e.bucket)}); err != nil {
		t.Fatalf("creating bucket %s on %s: %v", e.bucket, s3Endpoint, err)
	}
	socket := filepath.Join(t.TempDir(), "dp.sock")
	lis, err := listen(socket)
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	pb.RegisterDataPathServer(gs, srv)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	e.dp = pb.NewDataPathClient(conn)
	return e
}

func randomHex(n int) string {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rand.IntN(256))
	}
	return hex.EncodeToString(b)
}

// collect reads a stream to its end and checks its shape: zero or more progress messages (done values never
// decreasing), exactly one result, then OK. An error status instead of the result is returned as err.
func collect[T any, R comparable](t *testing.T, s grpc.ServerStreamingClient[T], split func(*T) (*pb.Progress, R)) ([]*pb.Progress, R, error) {
	t.Helper()
	var zero, res R
	var progress []*pb.Progress
	got := false
	for {
		ev, err := s.Recv()
		if errors.Is(err, io.EOF) {
			if !got {
				t.Fatalf("stream ended with OK but without a result")
			}
			return progress, res, nil
		}
		if err != nil {
			if got {
				t.Fatalf("error status after the result: %v", err)
			}
			return progress, zero, err
		}
		p, r := split(ev)
		switch {
		case got:
			t.Fatalf("message after the result: %v", ev)
		case p != nil:
			if n := len(progress); n > 0 && (p.DoneBytes < progress[n-1].DoneBytes || p.DoneFiles < progress[n-1].DoneFiles) {
				t.Fatalf("progress went back: %v after %v", p, progress[n-1])
			}
			progress = append(progress, p)
		case r != zero:
			res, got = r, true
		default:
			t.Fatalf("event with neither progress nor result")
		}
	}
}

func backup(t *testing.T, ctx context.Context, e *env, req *pb.BackupRequest) ([]*pb.Progress, *pb.BackupResult, error) {
	t.Helper()
	s, err := e.dp.Backup(ctx, req)
	if err != nil {
		return nil, nil, err
	}
	return collect(t, s, func(ev *pb.BackupEvent) (*pb.Progress, *pb.BackupResult) { return ev.GetProgress(), ev.GetResult() })
}

func restore(t *testing.T, ctx context.Context, e *env, req *pb.RestoreRequest) ([]*pb.Progress, *pb.RestoreResult, error) {
	t.Helper()
	s, err := e.dp.Restore(ctx, req)
	if err != nil {
		return nil, nil, err
	}
	return collect(t, s, func(ev *pb.RestoreEvent) (*pb.Progress, *pb.RestoreResult) { return ev.GetProgress(), ev.GetResult() })
}

func forget(t *testing.T, ctx context.Context, e *env, req *pb.ForgetRequest) (*pb.ForgetResult, error) {
	t.Helper()
	s, err := e.dp.Forget(ctx, req)
	if err != nil {
		return nil, err
	}
	_, r, err := collect(t, s, func(ev *pb.ForgetEvent) (*pb.Progress, *pb.ForgetResult) { return ev.GetProgress(), ev.GetResult() })
	return r, err
}

func wantCode(t *testing.T, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("want %v, got %v", code, err)
	}
}

func fsVolume(dir string) *pb.Volume {
	return &pb.Volume{Mode: pb.VolumeMode_VOLUME_MODE_FILESYSTEM, Path: dir}
}

func writeRandom(t *testing.T, p string, size int, seed uint64) {
	t.Helper()
	b := make([]byte, size)
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	r.Read(b)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// makeTree builds the test tree: files, nested directories, an empty file, an empty directory, symlinks
// (relative, absolute, dangling), unusual modes, fixed modification times and a 5 MiB file.
func makeTree(t *testing.T, dir string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"dir/sub/deeper", "emptydir"} {
		must(os.MkdirAll(filepath.Join(dir, d), 0o755))
	}
	must(os.WriteFile(filepath.Join(dir, "a.txt"), []byte("hello, ferry\n"), 0o644))
	must(os.WriteFile(filepath.Join(dir, "empty"), nil, 0o600))
	must(os.WriteFile(filepath.Join(dir, "dir/run.sh"), []byte("#!/bin/sh\necho hi\n"), 0o755))
	must(os.WriteFile(filepath.Join(dir, "dir/sub/deeper/read-only"), []byte("ro"), 0o444))
	must(os.WriteFile(filepath.Join(dir, "dir/sub/name with spaces and ünïcode"), []byte("x"), 0o640))
	long := strings.Repeat("long-name-", 12)
	must(os.MkdirAll(filepath.Join(dir, long, long), 0o755))
	must(os.WriteFile(filepath.Join(dir, long, long, long), []byte("past 100 bytes of name"), 0o644))
	writeRandom(t, filepath.Join(dir, "dir/big.bin"), 5<<20, 1)
	must(os.Symlink("dir/sub/deeper/read-only", filepath.Join(dir, "link")))
	must(os.Symlink("/nonexistent/absolute", filepath.Join(dir, "dir/abslink")))
	must(os.Chmod(filepath.Join(dir, "emptydir"), 0o750))
	old := time.Date(2020, 2, 29, 12, 34, 56, 789000000, time.UTC)
	must(os.Chtimes(filepath.Join(dir, "a.txt"), old, old))
	must(os.Chtimes(filepath.Join(dir, "dir/sub"), old, old))
}

type entry struct {
	mode  fs.FileMode
	size  int64
	mtime time.Time
	link  string
	data  []byte
}

// snapshotTree reads everything below dir (not dir itself).
func snapshotTree(t *testing.T, dir string) map[string]entry {
	t.Helper()
	out := map[string]entry{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		e := entry{mode: fi.Mode(), mtime: fi.ModTime()}
		switch {
		case fi.Mode().IsRegular():
			e.size = fi.Size()
			if e.data, err = os.ReadFile(p); err != nil {
				return err
			}
		case fi.Mode()&fs.ModeSymlink != 0:
			e.mtime = time.Time{} // symlink times are not restored
			if e.link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		out[rel] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func compareTrees(t *testing.T, src, dst string) {
	t.Helper()
	a, b := snapshotTree(t, src), snapshotTree(t, dst)
	for name, ea := range a {
		eb, ok := b[name]
		if !ok {
			t.Errorf("%s: missing after restore", name)
			continue
		}
		if ea.mode != eb.mode {
			t.Errorf("%s: mode %v, restored %v", name, ea.mode, eb.mode)
		}
		if ea.size != eb.size || !bytes.Equal(ea.data, eb.data) {
			t.Errorf("%s: content differs (%d bytes, restored %d)", name, ea.size, eb.size)
		}
		if ea.link != eb.link {
			t.Errorf("%s: link %q, restored %q", name, ea.link, eb.link)
		}
		if !ea.mtime.Equal(eb.mtime) {
			t.Errorf("%s: mtime %v, restored %v", name, ea.mtime, eb.mtime)
		}
	}
	for name := range b {
		if _, ok := a[name]; !ok {
			t.Errorf("%s: restored but not in the source", name)
		}
	}
}

// keys lists the bucket's objects below prefix.
func keys(t *testing.T, e *env, prefix string) []string {
	t.Helper()
	out, err := e.s3.ListObjectsV2(context.Background(), &s3.ListObjectsV2Input{Bucket: aws.String(e.bucket), Prefix: aws.String(prefix)})
	if err != nil {
		t.Fatal(err)
	}
	var ks []string
	for _, o := range out.Contents {
		ks = append(ks, aws.ToString(o.Key))
	}
	return ks
}

func uploads(t *testing.T, e *env) int {
	t.Helper()
	out, err := e.s3.ListMultipartUploads(context.Background(), &s3.ListMultipartUploadsInput{Bucket: aws.String(e.bucket)})
	if err != nil {
		t.Fatal(err)
	}
	return len(out.Uploads)
}

func TestGetInfo(t *testing.T) {
	e := newEnv(t, testServer())
	info, err := e.dp.GetInfo(context.Background(), &pb.GetInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.Name != "tar-example" || info.ApiVersion != "v1" || info.Version == "" {
		t.Fatalf("unexpected info %v", info)
	}
	want := []pb.Capability{pb.Capability_CAPABILITY_FILESYSTEM, pb.Capability_CAPABILITY_BACKUP,
		pb.Capability_CAPABILITY_RESTORE, pb.Capability_CAPABILITY_CANCEL, pb.Capability_CAPABILITY_FORGET}
	if fmt.Sprint(info.Capabilities) != fmt.Sprint(want) {
		t.Fatalf("capabilities %v, want %v", info.Capabilities, want)
	}
}

func TestBackupRestoreRoundTrip(t *testing.T) {
	srv := testServer()
	srv.slowRead = time.Millisecond // a few progress messages
	e := newEnv(t, srv)
	ctx := context.Background()
	src := t.TempDir()
	makeTree(t, src)
	prefix := "bsl/plugins/tar-example/ns1"

	progress, res, err := backup(t, ctx, e, &pb.BackupRequest{
		OperationId: "du-1", Repository: e.repo(prefix), Volume: fsVolume(src),
		Source: &pb.Source{Namespace: "ns1", Pvc: "data"}, Tags: map[string]string{"backup": "b1"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(progress) == 0 {
		t.Errorf("no progress message during a backup of several seconds")
	}
	if !validSnapshotID(res.SnapshotId) {
		t.Fatalf("snapshot id %q", res.SnapshotId)
	}
	var wantBytes uint64
	for _, en := range snapshotTree(t, src) {
		wantBytes += uint64(en.size)
	}
	tree := snapshotTree(t, src)
	if res.TotalBytes != wantBytes || res.Files != uint64(len(tree)) {
		t.Errorf("backup reported %d bytes in %d entries, want %d in %d", res.TotalBytes, res.Files, wantBytes, len(tree))
	}
	object := prefix + "/snapshots/" + res.SnapshotId + ".tar.gz"
	if res.Result["object"] != object {
		t.Errorf("result %v, want object %s", res.Result, object)
	}
	got := keys(t, e, prefix+"/")
	if fmt.Sprint(got) != fmt.Sprint([]string{strings.TrimSuffix(object, ".tar.gz") + ".json", object}) {
		t.Errorf("bucket holds %v", got)
	}
	meta, err := readMeta(ctx, e.s3, e.bucket, sidecarKey(object))
	if err != nil || meta.Tags["backup"] != "b1" || meta.OperationID != "du-1" || meta.Bytes != wantBytes {
		t.Errorf("sidecar %+v, %v", meta, err)
	}

	// Into an empty directory.
	dst := t.TempDir()
	_, rres, err := restore(t, ctx, e, &pb.RestoreRequest{
		OperationId: "dd-1", Repository: e.repo(prefix), Volume: fsVolume(dst),
		SnapshotId: res.SnapshotId,
	})
	if err != nil {
		t.Fatal(err)
	}
	if rres.TotalBytes != res.TotalBytes || rres.Files != res.Files {
		t.Errorf("restore reported %d bytes in %d entries, backup %d in %d", rres.TotalBytes, rres.Files, res.TotalBytes, res.Files)
	}
	compareTrees(t, src, dst)

	// Over a directory in the way: a file where a directory goes, a directory where a file goes, a stale
	// symlink pointing out of the volume where a regular file goes.
	dst2 := t.TempDir()
	outside := filepath.Join(t.TempDir(), "outside")
	os.WriteFile(filepath.Join(dst2, "dir"), []byte("a file in the way"), 0o644)
	os.MkdirAll(filepath.Join(dst2, "a.txt", "x"), 0o755)
	os.Symlink(outside, filepath.Join(dst2, "empty"))
	if _, _, err := restore(t, ctx, e, &pb.RestoreRequest{
		Repository: e.repo(prefix), Volume: fsVolume(dst2), SnapshotId: res.SnapshotId,
	}); err != nil {
		t.Fatal(err)
	}
	compareTrees(t, src, dst2)
	if _, err := os.Lstat(outside); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("restore wrote through a symlink out of the volume: %v", err)
	}
}

func TestRestoreUnknownSnapshot(t *testing.T) {
	e := newEnv(t, testServer())
	_, _, err := restore(t, context.Background(), e, &pb.RestoreRequest{
		Repository: e.repo("p"), Volume: fsVolume(t.TempDir()), SnapshotId: randomHex(16),
	})
	wantCode(t, err, codes.NotFound)
}

func TestValidation(t *testing.T) {
	e := newEnv(t, testServer())
	ctx := context.Background()
	dir := t.TempDir()
	ok := e.repo("p")
	noBucket := e.repo("p")
	noBucket.Bucket = ""
	for _, c := range []struct {
		name string
		req  *pb.BackupRequest
		code codes.Code
	}{
		{"no repository", &pb.BackupRequest{Volume: fsVolume(dir)}, codes.InvalidArgument},
		{"no bucket", &pb.BackupRequest{Repository: noBucket, Volume: fsVolume(dir)}, codes.InvalidArgument},
		{"no volume", &pb.BackupRequest{Repository: ok}, codes.InvalidArgument},
		{"block", &pb.BackupRequest{Repository: ok, Volume: &pb.Volume{Mode: pb.VolumeMode_VOLUME_MODE_BLOCK, Path: "/dev/null"}}, codes.FailedPrecondition},
		{"missing volume path", &pb.BackupRequest{Repository: ok, Volume: fsVolume(filepath.Join(dir, "nope"))}, codes.FailedPrecondition},
		{"deadline past", &pb.BackupRequest{Repository: ok, Volume: fsVolume(dir), DeadlineUnixMs: time.Now().Add(-time.Second).UnixMilli()}, codes.DeadlineExceeded},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := backup(t, ctx, e, c.req)
			wantCode(t, err, c.code)
		})
	}
	t.Run("restore without snapshot id", func(t *testing.T) {
		_, _, err := restore(t, ctx, e, &pb.RestoreRequest{Repository: ok, Volume: fsVolume(dir)})
		wantCode(t, err, codes.InvalidArgument)
	})
	t.Run("restore of a block volume", func(t *testing.T) {
		_, _, err := restore(t, ctx, e, &pb.RestoreRequest{Repository: ok, SnapshotId: randomHex(16),
			Volume: &pb.Volume{Mode: pb.VolumeMode_VOLUME_MODE_BLOCK, Path: "/dev/null"}})
		wantCode(t, err, codes.FailedPrecondition)
	})
	t.Run("forget without tags", func(t *testing.T) {
		_, err := forget(t, ctx, e, &pb.ForgetRequest{Repository: ok})
		wantCode(t, err, codes.InvalidArgument)
	})
	t.Run("forget without bucket", func(t *testing.T) {
		_, err := forget(t, ctx, e, &pb.ForgetRequest{Repository: noBucket, Tags: map[string]string{"a": "b"}})
		wantCode(t, err, codes.InvalidArgument)
	})
	if keys(t, e, "") != nil {
		t.Errorf("failed calls left objects: %v", keys(t, e, ""))
	}
}

// slowBackup starts a backup of 32 MiB of incompressible data read slowly enough to be stopped midway.
func slowBackup(t *testing.T) (*env, *pb.BackupRequest) {
	srv := testServer()
	srv.slowRead = 3 * time.Millisecond // 32 KiB reads: about 10 MiB/s
	e := newEnv(t, srv)
	src := t.TempDir()
	writeRandom(t, filepath.Join(src, "big"), 32<<20, 2)
	return e, &pb.BackupRequest{Repository: e.repo("ns"), Volume: fsVolume(src), Tags: map[string]string{"b": "1"}}
}

// waitEmpty waits until the bucket holds no object and no multipart upload.
func waitEmpty(t *testing.T, e *env) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		k, u := keys(t, e, ""), uploads(t, e)
		if len(k) == 0 && u == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("left behind: objects %v, %d multipart uploads", k, u)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestCancelBackup(t *testing.T) {
	e, req := slowBackup(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, err := e.dp.Backup(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	// Cancel once the multipart upload is under way.
	for {
		ev, err := s.Recv()
		if err != nil {
			t.Fatalf("backup ended before it could be canceled: %v", err)
		}
		if ev.GetResult() != nil {
			t.Fatal("backup finished before it could be canceled")
		}
		if uploads(t, e) > 0 {
			break
		}
	}
	cancel()
	for {
		ev, err := s.Recv()
		if err != nil {
			wantCode(t, err, codes.Canceled)
			break
		}
		if ev.GetResult() != nil {
			t.Fatal("result after cancel")
		}
	}
	waitEmpty(t, e)
}

func TestBackupDeadline(t *testing.T) {
	e, req := slowBackup(t)
	req.DeadlineUnixMs = time.Now().Add(time.Second).UnixMilli()
	_, _, err := backup(t, context.Background(), e, req)
	wantCode(t, err, codes.DeadlineExceeded)
	waitEmpty(t, e)
}

func TestForget(t *testing.T) {
	e := newEnv(t, testServer())
	ctx := context.Background()
	root := "bsl/plugins/tar-example"
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "f"), []byte("data"), 0o644)
	snap := func(ns string, tags map[string]string) string {
		prefix := root + "/" + ns
		if ns == "" {
			prefix = "bsl/other" // outside the root
		}
		_, res, err := backup(t, ctx, e, &pb.BackupRequest{Repository: e.repo(prefix), Volume: fsVolume(src), Tags: tags})
		if err != nil {
			t.Fatal(err)
		}
		return res.SnapshotId
	}
	a := snap("ns1", map[string]string{"velero.io/backup-name": "b1", "velero.io/backup-uid": "u1"})
	snap("ns2", map[string]string{"velero.io/backup-name": "b1", "velero.io/backup-uid": "u1"})
	c := snap("ns1", map[string]string{"velero.io/backup-name": "b2", "velero.io/backup-uid": "u2"})
	d := snap("ns2", map[string]string{"velero.io/backup-name": "b1", "velero.io/backup-uid": "other"})
	// Outside the root: never touched.
	other := snap("", map[string]string{"velero.io/backup-name": "b1", "velero.io/backup-uid": "u1"})

	tags := map[string]string{"velero.io/backup-name": "b1", "velero.io/backup-uid": "u1"}
	res, err := forget(t, ctx, e, &pb.ForgetRequest{OperationId: "f1", Repository: e.repo(root), Tags: tags})
	if err != nil {
		t.Fatal(err)
	}
	if res.Forgotten != 2 {
		t.Errorf("forgot %d snapshots, want 2", res.Forgotten)
	}
	var want []string
	for _, k := range []string{root + "/ns1/snapshots/" + c, root + "/ns2/snapshots/" + d} {
		want = append(want, k+".json", k+".tar.gz")
	}
	if got := keys(t, e, root+"/"); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("left %v, want %v", got, want)
	}
	if len(keys(t, e, "bsl/other/")) != 2 {
		t.Errorf("forget touched %s outside its root", other)
	}
	// Idempotent.
	if res, err := forget(t, ctx, e, &pb.ForgetRequest{Repository: e.repo(root), Tags: tags}); err != nil || res.Forgotten != 0 {
		t.Errorf("second forget: %v, %v", res, err)
	}
	_, _, err = restore(t, ctx, e, &pb.RestoreRequest{Repository: e.repo(root + "/ns1"), Volume: fsVolume(t.TempDir()), SnapshotId: a})
	wantCode(t, err, codes.NotFound)
}

// putTarGz stores a hand-made snapshot with the given entries.
func putTarGz(t *testing.T, e *env, key string, entries []tar.Header) {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	for _, h := range entries {
		h.Mode = 0o644
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		tw.Write(make([]byte, h.Size))
	}
	tw.Close()
	zw.Close()
	if _, err := e.s3.PutObject(context.Background(), &s3.PutObjectInput{Bucket: aws.String(e.bucket), Key: aws.String(key), Body: bytes.NewReader(buf.Bytes())}); err != nil {
		t.Fatal(err)
	}
}

func TestRestoreStaysInsideTheVolume(t *testing.T) {
	e := newEnv(t, testServer())
	for _, c := range []struct {
		name    string
		entries []tar.Header
		code    codes.Code
	}{
		{"dot-dot", []tar.Header{{Name: "../escaped", Typeflag: tar.TypeReg, Size: 1}}, codes.FailedPrecondition},
		{"nested dot-dot", []tar.Header{{Name: "a/../../escaped", Typeflag: tar.TypeReg, Size: 1}}, codes.FailedPrecondition},
		{"absolute", []tar.Header{{Name: "/tmp/escaped", Typeflag: tar.TypeReg, Size: 1}}, codes.FailedPrecondition},
		{"through a symlink", []tar.Header{
			{Name: "up", Typeflag: tar.TypeSymlink, Linkname: ".."},
			{Name: "up/escaped", Typeflag: tar.TypeReg, Size: 1},
		}, codes.Internal},
	} {
		t.Run(c.name, func(t *testing.T) {
			parent := t.TempDir()
			vol := filepath.Join(parent, "vol")
			os.Mkdir(vol, 0o755)
			id := randomHex(16)
			putTarGz(t, e, "p/snapshots/"+id+".tar.gz", c.entries)
			_, _, err := restore(t, context.Background(), e, &pb.RestoreRequest{Repository: e.repo("p"), Volume: fsVolume(vol), SnapshotId: id})
			wantCode(t, err, c.code)
			if _, err := os.Lstat(filepath.Join(parent, "escaped")); err == nil {
				t.Fatal("restore wrote outside the volume")
			}
		})
	}
	t.Run("corrupt", func(t *testing.T) {
		id := randomHex(16)
		e.s3.PutObject(context.Background(), &s3.PutObjectInput{Bucket: aws.String(e.bucket), Key: aws.String("p/snapshots/" + id + ".tar.gz"), Body: strings.NewReader("not gzip")})
		_, _, err := restore(t, context.Background(), e, &pb.RestoreRequest{Repository: e.repo("p"), Volume: fsVolume(t.TempDir()), SnapshotId: id})
		wantCode(t, err, codes.DataLoss)
	})
}

// TestTLS reaches S3 over HTTPS (a TLS proxy in front of the test server) with the proxy's CA in ca_file, and
// with insecure_skip_tls_verify; without either the certificate is refused.
func TestTLS(t *testing.T) {
	e := newEnv(t, testServer())
	target, _ := url.Parse(s3Endpoint)
	proxy := httptest.NewTLSServer(httputil.NewSingleHostReverseProxy(target)) // keeps the signed Host header
	defer proxy.Close()
	ca := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: proxy.Certificate().Raw}), 0o644)
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "f"), []byte("over TLS"), 0o644)
	ctx := context.Background()

	repo := e.repo("tls")
	repo.Endpoint = proxy.URL
	_, _, err := backup(t, ctx, e, &pb.BackupRequest{Repository: repo, Volume: fsVolume(src)})
	wantCode(t, err, codes.FailedPrecondition)

	repo.CaFile = ca
	_, res, err := backup(t, ctx, e, &pb.BackupRequest{Repository: repo, Volume: fsVolume(src)})
	if err != nil {
		t.Fatalf("with ca_file: %v", err)
	}
	repo.CaFile, repo.InsecureSkipTlsVerify = "", true
	dst := t.TempDir()
	if _, _, err := restore(t, ctx, e, &pb.RestoreRequest{Repository: repo, Volume: fsVolume(dst), SnapshotId: res.SnapshotId}); err != nil {
		t.Fatalf("with insecure_skip_tls_verify: %v", err)
	}
	compareTrees(t, src, dst)
}

// TestBinary runs the built binary (./build's output, passed by ./test) over a stale socket file, asks GetInfo
// and stops it with SIGTERM.
func TestBinary(t *testing.T) {
	bin := os.Getenv("FERRY_TAR_DATAPATH_BIN")
	if bin == "" {
		t.Skip("FERRY_TAR_DATAPATH_BIN not set (./test sets it)")
	}
	socket := filepath.Join(t.TempDir(), "run", "datapath.sock")
	os.MkdirAll(filepath.Dir(socket), 0o755)
	stale, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()

	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "FERRY_DATAPATH_SOCKET="+socket)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer cmd.Process.Kill()

	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := pb.NewDataPathClient(conn).GetInfo(ctx, &pb.GetInfoRequest{}, grpc.WaitForReady(true))
	if err != nil {
		t.Fatalf("GetInfo: %v; log:\n%s", err, logs.String())
	}
	if info.Name != "tar-example" {
		t.Errorf("name %q", info.Name)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v; log:\n%s", err, logs.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("still running 10 s after SIGTERM; log:\n%s", logs.String())
	}
}
