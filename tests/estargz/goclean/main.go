// goclean: read a JSON array of entry names on stdin and print, as a JSON array, each name
// as the reference eStargz reader reads it: strings.TrimPrefix(path.Clean("/"+name), "/")
// (estargz.go cleanEntryName). Used to check lazyd.estargz.names against Go itself.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path"
	"strings"
)

func main() {
	var names []string
	if err := json.NewDecoder(os.Stdin).Decode(&names); err != nil {
		fmt.Fprintf(os.Stderr, "goclean: %v\n", err)
		os.Exit(1)
	}
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = strings.TrimPrefix(path.Clean("/"+n), "/")
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintf(os.Stderr, "goclean: %v\n", err)
		os.Exit(1)
	}
}
