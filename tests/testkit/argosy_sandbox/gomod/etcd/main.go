// Command etcd builds the upstream etcd server for the Argosy sandbox.
// etcd's own go.mod uses replace directives, so `go install` of it fails;
// this wrapper pins the released modules instead.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
