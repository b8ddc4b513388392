package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/feature/s3/transfermanager"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "ferry.dev/examples/tar-datapath/gen/datapathv1"
)

// version is this data path's own version (GetInfoResponse.version); set with -ldflags "-X main.version=…".
var version = "0.1.0"

// Server implements ferry.datapath.v1.DataPath: one gzip-compressed tar object per snapshot in S3.
type Server struct {
	pb.UnimplementedDataPathServer

	// PartSize is the multipart part size. Parts are buffered in memory, (Concurrency+1) of them at most, and an
	// upload has at most 10,000 parts: the largest snapshot is 10,000 × PartSize of compressed data.
	PartSize int64
	// Concurrency is the number of parts uploaded at once.
	Concurrency int
	// ProgressEvery is the interval between progress messages.
	ProgressEvery time.Duration

	// slowRead delays every read of a file during backup (tests only: makes a backup slow enough to cancel).
	slowRead time.Duration
}

// NewServer returns a Server with production settings.
func NewServer() *Server {
	return &Server{PartSize: 32 << 20, Concurrency: 2, ProgressEvery: time.Second}
}

// snapshotMeta is the JSON sidecar <prefix>/snapshots/<id>.json, written once the tar object is complete:
// a snapshot exists for Forget only when its sidecar does.
type snapshotMeta struct {
	SnapshotID  string            `json:"snapshot_id"`
	Object      string            `json:"object"`
	Format      string            `json:"format"`
	OperationID string            `json:"operation_id"`
	Namespace   string            `json:"namespace,omitempty"`
	PVC         string            `json:"pvc,omitempty"`
	Tags        map[string]string `json:"tags"`
	Bytes       uint64            `json:"bytes"`
	Files       uint64            `json:"files"`
	StoredBytes uint64            `json:"stored_bytes"`
	Created     time.Time         `json:"created"`
}

func (s *Server) GetInfo(context.Context, *pb.GetInfoRequest) (*pb.GetInfoResponse, error) {
	return &pb.GetInfoResponse{
		Name:       "tar-example",
		Version:    version,
		ApiVersion: "v1",
		Capabilities: []pb.Capability{
			pb.Capability_CAPABILITY_FILESYSTEM,
			pb.Capability_CAPABILITY_BACKUP,
			pb.Capability_CAPABILITY_RESTORE,
			pb.Capability_CAPABILITY_CANCEL,
			pb.Capability_CAPABILITY_FORGET,
		},
	}, nil
}

func (s *Server) Backup(req *pb.BackupRequest, stream pb.DataPath_BackupServer) (err error) {
	defer logCall("backup", req.GetOperationId(), &err)()
	ctx, cancel, err := callContext(stream.Context(), req.GetDeadlineUnixMs())
	if err != nil {
		return err
	}
	defer cancel()
	repo := req.GetRepository()
	if err := validateRepository(repo); err != nil {
		return err
	}
	root, err := volumeDir(req.GetVolume())
	if err != nil {
		return err
	}
	client, err := newS3Client(ctx, repo)
	if err != nil {
		return err
	}
	id := newSnapshotID()
	key := snapshotKey(repo.GetPrefix(), id)

	// The tar is written into one end of a pipe while the transfer manager uploads from the other, part by part:
	// memory stays at a few parts whatever the volume's size. A failed or canceled upload aborts the multipart
	// upload (FailTimeout gives the abort a fresh context when the call's own has ended).
	tm := transfermanager.New(client, func(o *transfermanager.Options) {
		o.PartSizeBytes = s.PartSize
		o.MultipartUploadThreshold = s.PartSize
		o.Concurrency = s.Concurrency
		o.FailTimeout = time.Minute
		o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
	})
	pr, pw := io.Pipe()
	uploaded := make(chan error, 1)
	go func() {
		_, err := tm.UploadObject(ctx, &transfermanager.UploadObjectInput{
			Bucket:      aws.String(repo.GetBucket()),
			Key:         aws.String(key),
			Body:        pr,
			ContentType: aws.String("application/gzip"),
		})
		pr.CloseWithError(err) // a writer still writing learns that the upload stopped
		uploaded <- err
	}()

	var c counters
	stopProgress := s.progress(ctx, &c, func(p *pb.Progress) error {
		return stream.Send(&pb.BackupEvent{Event: &pb.BackupEvent_Progress{Progress: p}})
	})
	out := &pipeWriter{w: pw}
	walkErr := writeTarGz(ctx, root, out, &c, s.slowRead)
	pw.CloseWithError(walkErr) // nil: the upload sees EOF and completes
	upErr := <-uploaded
	stopProgress()

	var sidecarErr error
	if walkErr == nil && upErr == nil && ctx.Err() == nil {
		meta := snapshotMeta{
			SnapshotID: id, Object: key, Format: "tar+gzip", OperationID: req.GetOperationId(),
			Namespace: req.GetSource().GetNamespace(), PVC: req.GetSource().GetPvc(), Tags: req.GetTags(),
			Bytes: c.doneBytes.Load(), Files: c.doneFiles.Load(), StoredBytes: out.n.Load(),
			Created: time.Now().UTC(),
		}
		body, _ := json.MarshalIndent(meta, "", "  ")
		_, sidecarErr = client.PutObject(ctx, &s3.PutObjectInput{
			Bucket: aws.String(repo.GetBucket()), Key: aws.String(sidecarKey(key)),
			Body: bytes.NewReader(body), ContentType: aws.String("application/json"),
		})
		if sidecarErr == nil {
			return stream.Send(&pb.BackupEvent{Event: &pb.BackupEvent_Result{Result: &pb.BackupResult{
				SnapshotId:       id,
				TotalBytes:       meta.Bytes,
				Files:            meta.Files,
				IncrementalBytes: meta.StoredBytes,
				Result:           map[string]string{"object": key},
			}}})
		}
	}
	if upErr == nil {
		// The tar object may be complete while the call failed after it: remove it, so that nothing but
		// complete snapshots remains.
		dctx, dcancel := context.WithTimeout(context.Background(), time.Minute)
		defer dcancel()
		if _, err := client.DeleteObject(dctx, &s3.DeleteObjectInput{Bucket: aws.String(repo.GetBucket()), Key: aws.String(key)}); err != nil {
			log.Printf("backup %s: removing %s after a failure: %v", req.GetOperationId(), key, err)
		}
	}
	if st := ctxStatus(ctx, nil); st != nil {
		return st
	}
	if walkErr != nil && !errors.Is(walkErr, errUploadStopped) {
		return localStatus(ctx, "reading the volume", walkErr)
	}
	if upErr != nil {
		return s3Status(ctx, "uploading "+key, upErr)
	}
	return s3Status(ctx, "writing "+sidecarKey(key), sidecarErr)
}

func (s *Server) Restore(req *pb.RestoreRequest, stream pb.DataPath_RestoreServer) (err error) {
	defer logCall("restore", req.GetOperationId(), &err)()
	ctx, cancel, err := callContext(stream.Context(), req.GetDeadlineUnixMs())
	if err != nil {
		return err
	}
	defer cancel()
	repo := req.GetRepository()
	if err := validateRepository(repo); err != nil {
		return err
	}
	id := req.GetSnapshotId()
	if id == "" {
		return status.Error(codes.InvalidArgument, "snapshot_id is required")
	}
	if !validSnapshotID(id) {
		return status.Errorf(codes.InvalidArgument, "snapshot_id %q was not made by this data path", id)
	}
	root, err := volumeDir(req.GetVolume())
	if err != nil {
		return err
	}
	client, err := newS3Client(ctx, repo)
	if err != nil {
		return err
	}
	// The snapshot id names the object: it is all a restore gets from its backup (design/0004). The prefix is
	// the backup's, even when Velero restores into another namespace (it is keyed by the source namespace).
	key := snapshotKey(repo.GetPrefix(), id)

	var c counters
	if meta, err := readMeta(ctx, client, repo.GetBucket(), sidecarKey(key)); err == nil {
		c.totalBytes.Store(meta.Bytes)
		c.totalFiles.Store(meta.Files)
	}
	obj, err := client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(repo.GetBucket()), Key: aws.String(key)})
	if err != nil {
		if isNotFound(err) {
			return status.Errorf(codes.NotFound, "snapshot %s: no object %s in bucket %s", id, key, repo.GetBucket())
		}
		return s3Status(ctx, "reading "+key, err)
	}
	defer obj.Body.Close()

	stopProgress := s.progress(ctx, &c, func(p *pb.Progress) error {
		return stream.Send(&pb.RestoreEvent{Event: &pb.RestoreEvent_Progress{Progress: p}})
	})
	err = func() error {
		zr, err := gzip.NewReader(&ctxReader{ctx: ctx, r: obj.Body})
		if err != nil {
			return err
		}
		if err := extractTar(ctx, root, zr, &c); err != nil {
			return err
		}
		// Read to the end, so the gzip checksum of the whole stream is verified.
		_, err = io.Copy(io.Discard, zr)
		return err
	}()
	stopProgress()
	if err != nil {
		return localStatus(ctx, "restoring "+key, err)
	}
	return stream.Send(&pb.RestoreEvent{Event: &pb.RestoreEvent_Result{Result: &pb.RestoreResult{
		TotalBytes: c.doneBytes.Load(),
		Files:      c.doneFiles.Load(),
		Result:     map[string]string{"object": key},
	}}})
}

func (s *Server) Forget(req *pb.ForgetRequest, stream pb.DataPath_ForgetServer) (err error) {
	defer logCall("forget", req.GetOperationId(), &err)()
	ctx, cancel, err := callContext(stream.Context(), req.GetDeadlineUnixMs())
	if err != nil {
		return err
	}
	defer cancel()
	repo := req.GetRepository()
	if err := validateRepository(repo); err != nil {
		return err
	}
	if len(req.GetTags()) == 0 {
		return status.Error(codes.InvalidArgument, "tags are required (an empty set would match every snapshot)")
	}
	client, err := newS3Client(ctx, repo)
	if err != nil {
		return err
	}
	bucket := aws.String(repo.GetBucket())
	listPrefix := joinKey(repo.GetPrefix())
	if listPrefix != "" {
		listPrefix += "/"
	}

	var c counters // done_files: sidecars examined
	stopProgress := s.progress(ctx, &c, func(p *pb.Progress) error {
		return stream.Send(&pb.ForgetEvent{Event: &pb.ForgetEvent_Progress{Progress: p}})
	})
	var forgotten uint64
	err = func() error {
		pages := s3.NewListObjectsV2Paginator(client, &s3.ListObjectsV2Input{Bucket: bucket, Prefix: aws.String(listPrefix)})
		for pages.HasMorePages() {
			page, err := pages.NextPage(ctx)
			if err != nil {
				return s3Status(ctx, "listing "+listPrefix, err)
			}
			for _, obj := range page.Contents {
				key := aws.ToString(obj.Key)
				if !strings.HasSuffix(key, ".json") || path.Base(path.Dir(key)) != "snapshots" {
					continue
				}
				meta, err := readMeta(ctx, client, repo.GetBucket(), key)
				if isNotFound(err) {
					continue // forgotten meanwhile by another call
				}
				if err != nil {
					return s3Status(ctx, "reading "+key, err)
				}
				c.doneFiles.Add(1)
				if meta == nil || !hasAllTags(meta.Tags, req.GetTags()) {
					continue
				}
				// The tar first, then the sidecar: a call that stops in between is finished by the next one.
				for _, k := range []string{strings.TrimSuffix(key, ".json") + ".tar.gz", key} {
					if _, err := client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: bucket, Key: aws.String(k)}); err != nil {
						return s3Status(ctx, "deleting "+k, err)
					}
				}
				forgotten++
			}
		}
		return nil
	}()
	stopProgress()
	if err != nil {
		return err
	}
	return stream.Send(&pb.ForgetEvent{Event: &pb.ForgetEvent_Result{Result: &pb.ForgetResult{Forgotten: forgotten}}})
}

// readMeta reads a snapshot's sidecar; nil (and no error) for a sidecar that is not valid JSON.
func readMeta(ctx context.Context, client *s3.Client, bucket, key string) (*snapshotMeta, error) {
	obj, err := client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(bucket), Key: aws.String(key)})
	if err != nil {
		return nil, err
	}
	defer obj.Body.Close()
	body, err := io.ReadAll(io.LimitReader(obj.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	var meta snapshotMeta
	if err := json.Unmarshal(body, &meta); err != nil {
		log.Printf("ignoring %s: %v", key, err)
		return nil, nil
	}
	return &meta, nil
}

func hasAllTags(have, want map[string]string) bool {
	for k, v := range want {
		if hv, ok := have[k]; !ok || hv != v {
			return false
		}
	}
	return true
}

// progress sends a Progress message every ProgressEvery while something changed, until stop is called; stop
// returns once no more message can be sent, so the result is always the last message of the stream.
func (s *Server) progress(ctx context.Context, c *counters, send func(*pb.Progress) error) (stop func()) {
	done, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(s.ProgressEvery)
		defer t.Stop()
		var lastBytes, lastFiles uint64
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-t.C:
			}
			p := &pb.Progress{
				TotalBytes: c.totalBytes.Load(), DoneBytes: c.doneBytes.Load(),
				TotalFiles: c.totalFiles.Load(), DoneFiles: c.doneFiles.Load(),
			}
			if p.DoneBytes == lastBytes && p.DoneFiles == lastFiles {
				continue
			}
			lastBytes, lastFiles = p.DoneBytes, p.DoneFiles
			if send(p) != nil {
				return
			}
		}
	}()
	return func() {
		close(done)
		<-finished
	}
}

// errUploadStopped marks a write into the pipe that failed because the upload on its other end stopped.
var errUploadStopped = errors.New("upload stopped")

// pipeWriter counts the compressed bytes and tags the pipe's write errors with errUploadStopped.
type pipeWriter struct {
	w *io.PipeWriter
	n atomic.Uint64
}

func (p *pipeWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.n.Add(uint64(n))
	if err != nil {
		err = errors.Join(errUploadStopped, err)
	}
	return n, err
}

// callContext applies deadline_unix_ms on top of the gRPC deadline; a deadline already past is DEADLINE_EXCEEDED.
func callContext(ctx context.Context, deadlineMs int64) (context.Context, context.CancelFunc, error) {
	if deadlineMs > 0 {
		d := time.UnixMilli(deadlineMs)
		if !time.Now().Before(d) {
			return nil, nil, status.Errorf(codes.DeadlineExceeded, "deadline_unix_ms %d is in the past", deadlineMs)
		}
		ctx, cancel := context.WithDeadline(ctx, d)
		return ctx, cancel, nil
	}
	ctx, cancel := context.WithCancel(ctx)
	return ctx, cancel, nil
}

func validateRepository(repo *pb.Repository) error {
	if repo == nil {
		return status.Error(codes.InvalidArgument, "repository is required")
	}
	if repo.GetBucket() == "" {
		return status.Error(codes.InvalidArgument, "repository.bucket is required")
	}
	if p := repo.GetProvider(); p != "" && p != "aws" {
		return status.Errorf(codes.FailedPrecondition, "provider %q is not supported (S3-compatible storage only: \"aws\")", p)
	}
	return nil
}

// volumeDir checks the volume of a request and returns its directory.
func volumeDir(v *pb.Volume) (string, error) {
	if v.GetPath() == "" {
		return "", status.Error(codes.InvalidArgument, "volume.path is required")
	}
	if v.GetMode() == pb.VolumeMode_VOLUME_MODE_BLOCK {
		return "", status.Error(codes.FailedPrecondition, "block volumes are not supported")
	}
	dir, err := filepath.EvalSymlinks(v.GetPath())
	if err != nil {
		return "", status.Errorf(codes.FailedPrecondition, "volume: %v", err)
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return "", status.Errorf(codes.FailedPrecondition, "volume: %s is not a directory", v.GetPath())
	}
	return dir, nil
}

// localStatus maps an error of the local side (reading or writing the volume, decoding the stream).
func localStatus(ctx context.Context, what string, err error) error {
	if st := ctxStatus(ctx, err); st != nil {
		return st
	}
	if st, ok := status.FromError(err); ok {
		return st.Err()
	}
	if errors.Is(err, gzip.ErrHeader) || errors.Is(err, gzip.ErrChecksum) || errors.Is(err, tar.ErrHeader) ||
		errors.Is(err, io.ErrUnexpectedEOF) {
		return status.Errorf(codes.DataLoss, "%s: corrupt snapshot: %v", what, err)
	}
	return status.Errorf(codes.Internal, "%s: %v", what, err)
}

func newSnapshotID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func validSnapshotID(id string) bool {
	b, err := hex.DecodeString(id)
	return err == nil && len(b) == 16
}

func snapshotKey(prefix, id string) string { return joinKey(prefix, "snapshots", id+".tar.gz") }

func sidecarKey(tarKey string) string { return strings.TrimSuffix(tarKey, ".tar.gz") + ".json" }

func logCall(what, op string, err *error) func() {
	start := time.Now()
	log.Printf("%s %s: started", what, op)
	return func() {
		if *err != nil {
			log.Printf("%s %s: failed after %s: %v", what, op, time.Since(start).Round(time.Millisecond), *err)
		} else {
			log.Printf("%s %s: done in %s", what, op, time.Since(start).Round(time.Millisecond))
		}
	}
}
