// A Go net/http server behind nogap: takes its listener from LISTEN_FDS
// (fd 3, as systemd passes it), sends READY=1 to NOTIFY_SOCKET, answers
// with the pid that served (/slow after 6 s), and on SIGTERM stops
// gracefully with http.Server.Shutdown: it stops accepting, closes idle
// keep-alive connections, lets requests in progress finish, and exits when
// none is left (or after 20 s).
//
// Build: go build -o go_server go_server.go (no module, standard library
// only; tests/servers/go.rs builds it so).
package main

import (
	"context"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

// listener returns the socket passed at fd 3 by the systemd protocol.
func listener() (net.Listener, error) {
	if os.Getenv("LISTEN_PID") != strconv.Itoa(os.Getpid()) {
		return nil, fmt.Errorf("LISTEN_PID is %q, not this process", os.Getenv("LISTEN_PID"))
	}
	if n, _ := strconv.Atoi(os.Getenv("LISTEN_FDS")); n < 1 {
		return nil, fmt.Errorf("LISTEN_FDS is %q: no socket passed", os.Getenv("LISTEN_FDS"))
	}
	f := os.NewFile(3, "listen-fd-3")
	// FileListener dups the fd; the copy we got is not needed any more.
	defer f.Close()
	return net.FileListener(f)
}

// notify sends one sd_notify(3) message to NOTIFY_SOCKET, if it is set.
func notify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if path[0] == '@' {
		path = "\x00" + path[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = conn.Write([]byte(state))
	return err
}

func main() {
	ln, err := listener()
	if err != nil {
		log.Fatal(err)
	}
	gen := os.Getenv("NOGAP_GENERATION")
	pid := strconv.Itoa(os.Getpid())
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/slow" {
				log.Printf("slow request started pid %s", pid)
				time.Sleep(6 * time.Second)
			}
			w.Header().Set("X-Pid", pid)
			fmt.Fprintf(w, "pid %s gen %s\n", pid, gen)
		}),
		IdleTimeout: 60 * time.Second,
	}
	done := make(chan struct{})
	go func() {
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
		<-stop
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			log.Printf("shutdown: %v", err)
		}
		close(done)
	}()
	log.Printf("go %s serving on %s", pid, ln.Addr())
	if err := notify("READY=1"); err != nil {
		log.Printf("sd_notify: %v", err)
	}
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		log.Fatal(err)
	}
	<-done
}
