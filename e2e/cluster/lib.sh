# Shared settings for the e2e/cluster scripts. Sourced, not executed.
# shellcheck shell=bash
HERE=${HERE:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=e2e/cluster/versions.env
. "$HERE/versions.env"

FERRY_CACHE=${FERRY_CACHE:-/var/cache/ferry}
KEY=$(sha256sum "$HERE/versions.env" | cut -c1-12)
KDIR="$FERRY_CACHE/k8s-$KEY"
KBIN="$KDIR/bin"

FERRY_E2E_HOME=${FERRY_E2E_HOME:-/var/lib/ferry-e2e}
E2E=$FERRY_E2E_HOME
PKI=$E2E/pki
LOGS=$E2E/logs
RUN=$E2E/run            # pid files
CONF=$E2E/conf

NODE_NAME=${FERRY_NODE_NAME:-ferry-node}
NODE_IP=10.88.0.1        # CNI bridge gateway: apiserver, kubelet, S3 all bind here
POD_CIDR=10.88.0.0/16
SVC_CIDR=10.96.0.0/16
S3_PORT=9000
S3_BUCKET=ferry-e2e
S3_ACCESS=ferry-e2e-access
S3_SECRET=ferry-e2e-secret-0123456789
CSI_DRIVER=hostpath.csi.k8s.io
CSI_SOCK_DIR=/var/lib/kubelet/plugins/csi-hostpath
CSI_SOCK=$CSI_SOCK_DIR/csi.sock
CSI_STATE=$E2E/csi-data
CTR_ROOT=$E2E/containerd        # containerd root (images, snapshots)
CTR_STATE=/run/ferry-e2e/containerd
CTR_SOCK=$CTR_STATE/containerd.sock
TEST_IMAGE=localhost/ferry-e2e-tools:e2e   # busybox (static) + s3probe + kubeprobe
PAUSE_IMAGE=localhost/ferry-pause:e2e

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

kc() { "$KBIN/kubectl" --kubeconfig "$E2E/kubeconfig" "$@"; }
