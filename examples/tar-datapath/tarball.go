package main

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// counters is what progress messages report; written by the worker, read by the progress sender.
type counters struct {
	totalBytes, totalFiles atomic.Uint64
	doneBytes, doneFiles   atomic.Uint64
}

// ctxReader stops reading once the call's context ends, counts what it read, and (in tests only) reads slowly.
type ctxReader struct {
	ctx   context.Context
	r     io.Reader
	n     *atomic.Uint64
	delay time.Duration
}

func (r *ctxReader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	if r.delay > 0 {
		select {
		case <-time.After(r.delay):
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		}
	}
	n, err := r.r.Read(p)
	if r.n != nil {
		r.n.Add(uint64(n))
	}
	return n, err
}

// writeTarGz writes the tree under root as a gzip-compressed tar to w: directories, regular files and symlinks
// with their modes, owners and modification times. Sockets, FIFOs and device nodes are skipped; hard links are
// stored as separate files. The root directory itself is not stored (restore leaves the target's root as it is).
func writeTarGz(ctx context.Context, root string, w io.Writer, c *counters, slowRead time.Duration) error {
	zw := gzip.NewWriter(w)
	tw := tar.NewWriter(zw)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil || rel == "." {
			return err
		}
		info, err := d.Info() // lstat: symlinks are not followed
		if err != nil {
			return err
		}
		var link string
		switch {
		case info.Mode().IsRegular(), info.IsDir():
		case info.Mode()&fs.ModeSymlink != 0:
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		default:
			return nil
		}
		hdr, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		if info.IsDir() {
			hdr.Name += "/"
		}
		hdr.Uname, hdr.Gname = "", ""
		hdr.Format = tar.FormatPAX // long names, sub-second modification times
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if info.Mode().IsRegular() {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			n, err := io.CopyN(tw, &ctxReader{ctx: ctx, r: f, n: &c.doneBytes, delay: slowRead}, hdr.Size)
			f.Close()
			if errors.Is(err, io.EOF) {
				return fmt.Errorf("%s shrank while being read (%d of %d bytes)", rel, n, hdr.Size)
			}
			if err != nil {
				return err
			}
		}
		c.doneFiles.Add(1)
		return nil
	})
	if err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return zw.Close()
}

// safeName checks a tar entry name and returns it cleaned, relative to the restore target; "" for the root.
// Absolute names and names with a ".." component are refused: a snapshot never holds them, so one that does
// was not written by this data path.
func safeName(name string) (string, error) {
	if strings.HasPrefix(name, "/") {
		return "", status.Errorf(codes.FailedPrecondition, "snapshot entry %q: absolute path", name)
	}
	for _, part := range strings.Split(name, "/") {
		if part == ".." {
			return "", status.Errorf(codes.FailedPrecondition, "snapshot entry %q: path traversal", name)
		}
	}
	clean := path.Clean(name)
	if clean == "." {
		return "", nil
	}
	return clean, nil
}

// extractTar unpacks a tar stream into root. All file system access goes through an os.Root, so neither an
// entry's name nor a symlink (from the snapshot or already in the volume) can make it write outside root.
// Existing entries in the way are replaced; directory modes and times are applied last.
func extractTar(ctx context.Context, root string, r io.Reader, c *counters) error {
	rt, err := os.OpenRoot(root)
	if err != nil {
		return status.Errorf(codes.FailedPrecondition, "volume: %v", err)
	}
	defer rt.Close()
	asRoot := os.Geteuid() == 0
	type dirMeta struct {
		name  string
		mode  fs.FileMode
		mtime time.Time
	}
	var dirs []dirMeta
	tr := tar.NewReader(r)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		name, err := safeName(hdr.Name)
		if err != nil {
			return err
		}
		if name == "" {
			continue
		}
		mode := hdr.FileInfo().Mode() & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
		if dir := path.Dir(name); dir != "." {
			if err := rt.MkdirAll(dir, 0o755); err != nil {
				return err
			}
		}
		switch hdr.Typeflag {
		case tar.TypeDir:
			if fi, err := rt.Lstat(name); err == nil && !fi.IsDir() {
				if err := rt.Remove(name); err != nil {
					return err
				}
			}
			if err := rt.MkdirAll(name, 0o700); err != nil {
				return err
			}
			dirs = append(dirs, dirMeta{name, mode, hdr.ModTime})
		case tar.TypeReg:
			if err := removeExisting(rt, name); err != nil {
				return err
			}
			f, err := rt.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, &ctxReader{ctx: ctx, r: tr, n: &c.doneBytes})
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
		case tar.TypeSymlink:
			if err := removeExisting(rt, name); err != nil {
				return err
			}
			if err := rt.Symlink(hdr.Linkname, name); err != nil {
				return err
			}
		default:
			continue // not written by writeTarGz
		}
		if asRoot {
			if err := rt.Lchown(name, hdr.Uid, hdr.Gid); err != nil {
				return err
			}
		}
		if hdr.Typeflag == tar.TypeReg {
			if err := rt.Chmod(name, mode); err != nil {
				return err
			}
			if err := rt.Chtimes(name, hdr.ModTime, hdr.ModTime); err != nil {
				return err
			}
		}
		c.doneFiles.Add(1)
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		d := dirs[i]
		if err := rt.Chmod(d.name, d.mode); err != nil {
			return err
		}
		if err := rt.Chtimes(d.name, d.mtime, d.mtime); err != nil {
			return err
		}
	}
	return nil
}

// removeExisting removes whatever is at name (nothing there is fine), so a file or symlink can take its place.
func removeExisting(rt *os.Root, name string) error {
	fi, err := rt.Lstat(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return rt.RemoveAll(name)
	}
	return rt.Remove(name)
}
