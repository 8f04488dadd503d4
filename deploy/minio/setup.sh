#!/bin/bash
# compose.yaml's createbucket service: the bucket, then one MinIO user for workers and one for
# aggregators, each with its policy from this folder.
#
#   worker-policy.json      s3:PutObject only under diloco/runs/*/deltas/, s3:GetObject under
#                           diloco/runs/, listing only under diloco/
#   aggregator-policy.json  get, put, delete and list under diloco/
#
# Both also get s3:HeadBucket, which MinIO checks for HEAD bucket (the services' startup check,
# S3Store.check) before it falls back to an unconditioned s3:ListBucket.
#
# The policy files name the bucket as ${BUCKET}; it is replaced here by the BUCKET variable, so
# any bucket name works. Objects live under the fixed prefix diloco/ (compose.yaml's DILOCO_STORE
# is s3://${BUCKET}/diloco), which the files spell out.
#
# Safe to run again (every `docker compose up` does): policies are replaced with the current files,
# `mc admin user add` sets the current password of an existing user (password rotation), and a
# policy already attached is fine.
#
# The minio/mc image has bash and mc but no sed, grep or awk: this script uses bash builtins only.
# Secrets come from the environment and are never printed.
set -euo pipefail

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${BUCKET:?}"
: "${MINIO_WORKER_USER:?}" "${MINIO_WORKER_PASSWORD:?}"
: "${MINIO_AGGREGATOR_USER:?}" "${MINIO_AGGREGATOR_PASSWORD:?}"
here=${0%/*}
work=${TMPDIR:-/tmp}
endpoint=${MINIO_ENDPOINT:-http://minio:9000}

# S3 bucket naming rules, so the name is safe to put into the policy text as it is
if [[ ! $BUCKET =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]]; then
    echo "BUCKET=$BUCKET is not a valid bucket name (3-63 of a-z 0-9 . -)" >&2
    exit 1
fi
for role in WORKER AGGREGATOR; do
    user_var=MINIO_${role}_USER pass_var=MINIO_${role}_PASSWORD
    user=${!user_var} pass=${!pass_var}
    if [[ $user == "$MINIO_ROOT_USER" || ${#user} -lt 3 ]]; then
        echo "$user_var must have at least 3 characters and differ from MINIO_ROOT_USER" >&2
        exit 1
    fi
    if (( ${#pass} < 8 )); then
        echo "$pass_var must have at least 8 characters (MinIO's minimum)" >&2
        exit 1
    fi
done

# The policy file $1 with every ${BUCKET} replaced by the bucket name, written to $2.
render() {
    local text placeholder='${BUCKET}'
    text=$(<"$1")
    printf '%s\n' "${text//"$placeholder"/$BUCKET}" > "$2"
}

# mc exits 1 when the policy is already attached; only that is not an error.
attach() {
    local out
    if out=$(mc admin policy attach minio "$1" --user "$2" 2>&1); then
        echo "$out"
    elif [[ $out == *"already in effect"* ]]; then
        echo "policy $1 is attached to user $2"
    else
        echo "$out" >&2
        return 1
    fi
}

mc alias set minio "$endpoint" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "minio/$BUCKET"

for role in worker aggregator; do
    user_var=MINIO_${role^^}_USER pass_var=MINIO_${role^^}_PASSWORD
    policy=diloco-$role
    render "$here/$role-policy.json" "$work/$policy.json"
    mc admin policy create minio "$policy" "$work/$policy.json"
    mc admin user add minio "${!user_var}" "${!pass_var}" >/dev/null
    echo "user ${!user_var} is set"
    attach "$policy" "${!user_var}"
done
