// reftree: print the file tree that the reference eStargz reader (stargz-snapshotter's
// estargz package) builds from a blob, one JSON object per line, walking from the root
// with Lookup("") and ForeachChild: path, type, mode, uid, gid, size, link target and the
// sha256 of every regular file's bytes (read with Reader.OpenFile). Used by the interop
// tests to compare the reference's view of a layer with lazyd's.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"

	"github.com/containerd/stargz-snapshotter/estargz"
)

type node struct {
	Path   string `json:"path"`
	Type   string `json:"type"`
	Mode   int64  `json:"mode"`
	UID    int    `json:"uid"`
	GID    int    `json:"gid"`
	Size   int64  `json:"size"`
	Link   string `json:"link,omitempty"`
	SHA256 string `json:"sha256,omitempty"`
}

func die(f string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "reftree: "+f+"\n", a...)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 2 {
		die("usage: reftree BLOB")
	}
	f, err := os.Open(os.Args[1])
	if err != nil {
		die("%v", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		die("%v", err)
	}
	r, err := estargz.Open(io.NewSectionReader(f, 0, st.Size()))
	if err != nil {
		die("estargz.Open: %v", err)
	}
	root, ok := r.Lookup("")
	if !ok {
		die("no root entry")
	}
	enc := json.NewEncoder(os.Stdout)
	var walk func(p string, e *estargz.TOCEntry, depth int)
	walk = func(p string, e *estargz.TOCEntry, depth int) {
		if depth > 256 {
			die("tree deeper than 256 at %q", p)
		}
		n := node{Path: p, Type: e.Type, Mode: e.Mode, UID: e.UID, GID: e.GID, Size: e.Size}
		if e.Type == "symlink" {
			n.Link = e.LinkName
		}
		if e.Type == "reg" {
			fr, err := r.OpenFile(p)
			if err != nil {
				die("OpenFile %q: %v", p, err)
			}
			h := sha256.New()
			if _, err := io.Copy(h, io.NewSectionReader(fr, 0, fr.Size())); err != nil {
				die("read %q: %v", p, err)
			}
			n.SHA256 = hex.EncodeToString(h.Sum(nil))
		}
		if err := enc.Encode(n); err != nil {
			die("%v", err)
		}
		e.ForeachChild(func(base string, child *estargz.TOCEntry) bool {
			walk(path.Join(p, base), child, depth+1)
			return true
		})
	}
	walk("", root, 0)
}
