//go:build tools

// Package tools pins the upstream command e2e/velero/build compiles from this wrapper module,
// so `go mod tidy` keeps github.com/vmware-tanzu/velero (and its whole dependency graph) at the
// version named in e2e/velero/build.
package tools

import (
	_ "github.com/vmware-tanzu/velero/cmd/velero"
)
