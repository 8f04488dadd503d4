#!/bin/sh
# Starts redis-server with an ACL file: the admin (`default`) user's password comes from
# REDIS_PASSWORD, the worker, aggregator and evaluator users from the file (`diloco acl --save`).
#
#   sh start.sh [redis-server options...]      (compose.yaml's redis service runs this)
#
# Why not --requirepass: redis-server ignores it when --aclfile is given ("requirepass is not
# compatible with aclfile", redis.conf), and an ACL file without a `user default` line leaves the
# default user with no password at all. So this script writes that line itself, before each start,
# from REDIS_PASSWORD: the password in .env is always the one in force (rotate it by changing .env
# and restarting redis), and only its sha256 is on disk. Every other line is kept as it is.
#
# REDIS_ACL_FILE (default /data/users.acl) is the file; it is created if missing. The server is
# started through the image's docker-entrypoint.sh, which hands /data to the redis user and drops
# root before exec'ing redis-server.
set -eu
umask 077  # the file holds password hashes

: "${REDIS_PASSWORD:?REDIS_PASSWORD is not set}"
acl="${REDIS_ACL_FILE:-/data/users.acl}"

touch "$acl"
hash=$(printf '%s' "$REDIS_PASSWORD" | sha256sum | cut -d ' ' -f 1)
{
    echo "user default on #$hash ~* &* +@all"
    # grep exits 1 when it selects no line (a new file): that is fine, anything else is not.
    grep -v '^user default ' "$acl" || [ $? -eq 1 ]
} > "$acl.new"
mv "$acl.new" "$acl"

exec docker-entrypoint.sh redis-server --aclfile "$acl" "$@"
