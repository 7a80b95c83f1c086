#!/usr/bin/env bash
# A mirror with one local leg (a file) and one remote leg (nbdkit serving a
# file over NBD). Takes the remote leg out with fail-leg, writes while it is
# away, and brings it back with readd-leg, which copies only what was written
# meanwhile. Everything it makes is removed when it exits.
#
#   examples/mirror-with-remote-leg.sh
#   DMIO_NBD=/path/to/dmio-nbd examples/mirror-with-remote-leg.sh
set -euo pipefail

DMIO_NBD=${DMIO_NBD:-$(dirname "$0")/../.build/debug/dmio-nbd}
work=$(mktemp -d /tmp/dmio-example.XXXXXX)
socket=$work/mirror.sock
uri="nbd+unix:///?socket=$socket"
remote_socket=$work/remote.sock
# Over TCP, from another host, it would be nbd://host:port/ instead.
remote_uri="nbd+unix:///?socket=$remote_socket"
server=
nbdkit=

cleanup() {
    set +e   # undo everything, even if one part fails
    [[ -n $server ]] && kill "$server" && wait "$server"
    [[ -n $nbdkit ]] && kill "$nbdkit" && wait "$nbdkit"
    rm -rf "$work"
}
trap cleanup EXIT

wait_for_socket() {   # $1 = socket, $2 = the pid that should make it
    until [[ -S $1 ]]; do
        kill -0 "$2" 2>/dev/null || { echo "pid $2 exited before making $1" >&2; exit 1; }
        sleep 0.1
    done
}

status() { "$DMIO_NBD" status --socket "$socket"; }

# The first line's in-sync count ("510/510") is complete once nothing is left to copy.
in_sync() { status | awk 'NR == 1 { split($4, n, "/"); exit n[1] != n[2] }'; }
no_dirty_regions() { status | grep -q ', 0 dirty,'; }

echo "== the remote leg: nbdkit serving a sparse 256 MiB file"
truncate -s 256M "$work/remote.img"
nbdkit --foreground --unix "$remote_socket" file "$work/remote.img" &
nbdkit=$!
wait_for_socket "$remote_socket" "$nbdkit"

echo "== create the mirror: local.img (made here by --size) and the remote leg"
# Both legs are all zeroes, so they agree already: --assume-clean.
"$DMIO_NBD" create --size 256M --assume-clean "$work/local.img" "$remote_uri"

echo "== serve it"
"$DMIO_NBD" serve --socket "$socket" "$work/local.img" "$remote_uri" 2>"$work/server.log" &
server=$!
wait_for_socket "$socket" "$server"
qemu-io -f raw "$uri" -c 'write -P 0x11 0 8M'
status   # 16 dirty: the regions just written

# A region's bit in the write-intent bitmap is cleared lazily, once the
# region has been idle for a few seconds; until then a re-added leg would
# get it too. Waiting makes the count below exact.
until no_dirty_regions; do sleep 0.5; done

echo "== fail-leg 1: the remote leg is out, as if its host went away"
"$DMIO_NBD" fail-leg 1 --socket "$socket"
# Writes still succeed (on leg 0 alone); the regions they touch are marked
# dirty in the write-intent bitmap: 4 MiB = 8 regions of 512 KiB.
qemu-io -f raw "$uri" -c 'write -P 0x22 64M 4M'
status   # leg 1 degraded (D), 8 dirty regions

echo "== readd-leg 1: only the 8 dirty regions are copied back"
"$DMIO_NBD" readd-leg 1 --socket "$socket"
until in_sync; do sleep 0.2; done
status   # both in sync, "last resync: ... copied 8 of 8 regions"
qemu-io -f raw "$uri" -c 'read -P 0x11 0 8M' -c 'read -P 0x22 64M 4M'

echo "== stop the server; the two legs' data areas are the same"
kill "$server"
wait "$server"
server=
cmp -i 1048576 "$work/local.img" "$work/remote.img" && echo "identical past the first MiB"
echo "== what the server logged"
cat "$work/server.log"
