// Command tar-datapath is an example data path for Ferry: it serves ferry.datapath.v1.DataPath on a unix socket
// and stores each backup as one gzip-compressed tar object in S3. See README.md.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"google.golang.org/grpc"

	pb "ferry.dev/examples/tar-datapath/gen/datapathv1"
)

func main() {
	defaultSocket := os.Getenv("FERRY_DATAPATH_SOCKET")
	if defaultSocket == "" {
		defaultSocket = "/ferry/run/datapath.sock"
	}
	socket := flag.String("socket", defaultSocket, "unix socket to serve on (env FERRY_DATAPATH_SOCKET)")
	partMiB := flag.Int64("part-size-mib", 32, "S3 multipart part size in MiB (largest snapshot: 10,000 parts)")
	concurrency := flag.Int("concurrency", 2, "S3 parts uploaded at once")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println(version)
		return
	}
	log.SetFlags(log.LstdFlags | log.LUTC)

	srv := NewServer()
	srv.PartSize = *partMiB << 20
	srv.Concurrency = *concurrency
	if srv.PartSize < 5<<20 || srv.Concurrency < 1 {
		log.Fatal("--part-size-mib must be at least 5 and --concurrency at least 1")
	}
	lis, err := listen(*socket)
	if err != nil {
		log.Fatal(err)
	}
	gs := grpc.NewServer()
	pb.RegisterDataPathServer(gs, srv)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		sig := <-sigs
		log.Printf("%v: stopping (running calls get 30 s to end)", sig)
		t := time.AfterFunc(30*time.Second, gs.Stop)
		gs.GracefulStop()
		t.Stop()
	}()
	log.Printf("tar-datapath %s serving ferry.datapath.v1 on %s", version, *socket)
	if err := gs.Serve(lis); err != nil {
		log.Fatal(err)
	}
	log.Print("stopped")
}

// listen creates the unix socket, replacing a stale socket file left by an earlier run.
func listen(socket string) (net.Listener, error) {
	if fi, err := os.Lstat(socket); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("%s exists and is not a socket", socket)
		}
		if err := os.Remove(socket); err != nil {
			return nil, err
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(socket), 0o755); err != nil {
		return nil, err
	}
	return net.Listen("unix", socket)
}
