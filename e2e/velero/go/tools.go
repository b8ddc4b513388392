//go:build tools

// Package tools pins the upstream commands e2e/velero/build compiles from this wrapper module
// (Velero and its AWS object-store plugin, from one dependency graph), so `go mod tidy` keeps both
// and their whole dependency graph at the versions named in e2e/velero/build.
package tools

import (
	_ "github.com/vmware-tanzu/velero-plugin-for-aws/velero-plugin-for-aws"
	_ "github.com/vmware-tanzu/velero/cmd/velero"
)
