// etcd-embed runs a single-member etcd (go.etcd.io/etcd/server/v3/embed) for the test control
// plane: test infrastructure only, never part of cachalot. Built by scripts/control-plane.
//
// Usage: etcd-embed DATADIR CLIENT_URL PEER_URL   (for example http://127.0.0.1:2379)
// It prints "etcd ready" once it serves, and stops on SIGTERM or SIGINT.
package main

import (
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"go.etcd.io/etcd/server/v3/embed"
)

func mustURL(raw string) url.URL {
	u, err := url.Parse(raw)
	if err != nil {
		log.Fatalf("bad URL %q: %v", raw, err)
	}
	return *u
}

func main() {
	if len(os.Args) != 4 {
		log.Fatal("usage: etcd-embed DATADIR CLIENT_URL PEER_URL")
	}
	cfg := embed.NewConfig()
	cfg.Name = "cachalot-test"
	cfg.Dir = os.Args[1]
	cfg.LogLevel = "warn"
	// Tests only: a crash loses the test cluster anyway, and fsync dominates start-up on slow disks.
	cfg.UnsafeNoFsync = true
	client, peer := mustURL(os.Args[2]), mustURL(os.Args[3])
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{client}, []url.URL{client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peer}, []url.URL{peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer e.Close()
	<-e.Server.ReadyNotify()
	log.Printf("etcd ready at %s", client.String())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	select {
	case err := <-e.Err():
		log.Fatal(err)
	case <-sig:
	}
}
