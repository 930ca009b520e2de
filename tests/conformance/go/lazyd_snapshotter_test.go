// Package conformance runs containerd's snapshotter conformance suite (snapshots/testsuite)
// against `lazyd snapshotter`, through containerd's gRPC proxy client, with a fresh
// snapshotter process per test.
//
// Build and run: tests/conformance/build.sh, then
//
//	lazyd-snapshotter-suite.test -test.v -test.root -lazyd "python3 -m lazyd.cli.lazyd"
package conformance

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

var (
	lazydCmd     = flag.String("lazyd", "lazyd", "command line that runs lazyd (split on spaces), e.g. \"python3 -m lazyd.cli.lazyd\"")
	startTimeout = flag.Duration("start-timeout", 60*time.Second, "how long to wait for a snapshotter's socket")
	stopTimeout  = flag.Duration("stop-timeout", 20*time.Second, "how long a snapshotter may take to exit after SIGTERM")
)

// snapshotterName is the name the proxy client sends; lazyd ignores it.
const snapshotterName = "lazyd"

func TestLazydSnapshotter(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the snapshotter conformance suite mounts overlayfs: run it as root")
	}
	testsuite.SnapshotterSuite(t, snapshotterName, newLazydSnapshotter)
}

// logTail is the last n bytes of the file at path (or why it could not be read).
func logTail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	if len(data) > n {
		data = data[len(data)-n:]
	}
	return string(bytes.TrimSpace(data))
}

// newLazydSnapshotter starts `lazyd snapshotter` with its state in root/state and its socket
// at root/snapshotter.sock, and returns a proxy client plus a func that stops the process.
func newLazydSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	argv := strings.Fields(*lazydCmd)
	if len(argv) == 0 {
		return nil, nil, errors.New("-lazyd is empty")
	}
	config := filepath.Join(root, "config.toml") // empty: defaults only, never the host's /etc/lazyd
	if err := os.WriteFile(config, nil, 0o644); err != nil {
		return nil, nil, err
	}
	sock := filepath.Join(root, "snapshotter.sock")
	logPath := filepath.Join(root, "snapshotter.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	defer logFile.Close() // the child holds its own descriptor
	argv = append(argv, "snapshotter", "--config", config, "--root", filepath.Join(root, "state"),
		"--address", sock, "--lazyd-socket", filepath.Join(root, "lazyd.sock"), "--log-level", "info")
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logFile, logFile // same process group: whoever kills the suite's group kills these too
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start %v: %w", argv, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	// stop sends SIGTERM and waits; SIGKILL after stopTimeout. A non-zero exit is an error.
	stopped := false
	var stopErr error
	stop := func() error {
		if stopped {
			return stopErr
		}
		stopped = true
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				stopErr = fmt.Errorf("lazyd snapshotter exited with %v; log:\n%s", err, logTail(logPath, 3000))
			}
		case <-time.After(*stopTimeout):
			_ = cmd.Process.Kill()
			<-exited
			stopErr = fmt.Errorf("lazyd snapshotter did not exit within %v of SIGTERM; log:\n%s", *stopTimeout, logTail(logPath, 3000))
		}
		return stopErr
	}

	deadline := time.Now().Add(*startTimeout)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case err := <-exited:
			stopped, stopErr = true, err
			return nil, nil, fmt.Errorf("lazyd snapshotter exited before serving (%v); log:\n%s", err, logTail(logPath, 3000))
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = stop()
			return nil, nil, fmt.Errorf("no socket %s after %v; log:\n%s", sock, *startTimeout, logTail(logPath, 3000))
		}
	}

	dialCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(dialCtx, sock, grpc.WithBlock(),
		grpc.WithInsecure(), // Debian's grpc-go predates credentials/insecure
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}))
	if err != nil {
		stopErr := stop()
		return nil, nil, fmt.Errorf("dial %s: %v (stop: %v)", sock, err, stopErr)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), snapshotterName)
	closeFn := func() error {
		connErr := conn.Close()
		if err := stop(); err != nil {
			return err
		}
		return connErr
	}
	return sn, closeFn, nil
}
