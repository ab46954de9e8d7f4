#!/bin/sh
# Start SeaweedFS's S3 server with three identities, written from the environment into a
# file only the server can read (never into the compose file or the image):
#
#   admin     S3_ADMIN_ACCESS_KEY / S3_ADMIN_SECRET_KEY        everything (the one-shot bucket set-up only)
#   worker    S3_WORKER_ACCESS_KEY / S3_WORKER_SECRET_KEY      read BUCKET/models/*; read and write BUCKET/PREFIX/*; list BUCKET
#   producer  S3_PRODUCER_ACCESS_KEY / S3_PRODUCER_SECRET_KEY  read and write BUCKET/PREFIX/*; list BUCKET
#
# Neither the worker nor the producer can touch another bucket, create or delete buckets, or
# (the producer) read the models. Deleting many objects at once (`actviz gc`) is a bucket-wide
# permission in SeaweedFS; the bucket's lifecycle rule expires results instead.
#
# Runs as root, then hands over to the image's own entrypoint, which drops to uid 1000.
set -eu

: "${BUCKET:?}" "${PREFIX:?}"
: "${S3_ADMIN_ACCESS_KEY:?}" "${S3_ADMIN_SECRET_KEY:?}"
: "${S3_WORKER_ACCESS_KEY:?}" "${S3_WORKER_SECRET_KEY:?}"
: "${S3_PRODUCER_ACCESS_KEY:?}" "${S3_PRODUCER_SECRET_KEY:?}"
CONFIG=${S3_CONFIG_PATH:-/tmp/actviz-s3.json}
SEAWEEDFS_ENTRYPOINT=${SEAWEEDFS_ENTRYPOINT:-/entrypoint.sh}

for value in "$BUCKET" "$PREFIX" "$S3_ADMIN_ACCESS_KEY" "$S3_ADMIN_SECRET_KEY" "$S3_WORKER_ACCESS_KEY" \
  "$S3_WORKER_SECRET_KEY" "$S3_PRODUCER_ACCESS_KEY" "$S3_PRODUCER_SECRET_KEY"; do
  case "$value" in
    *'"'* | *'\'* | *' '*) echo "seaweedfs-start: keys, the bucket and the prefix may not hold quotes, backslashes or spaces" >&2; exit 2 ;;
  esac
done

identity() { # name access secret action...
  name=$1 access=$2 secret=$3
  shift 3
  actions=""
  for action in "$@"; do actions="$actions${actions:+, }\"$action\""; done
  printf '    {"name": "%s", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], "actions": [%s]}' \
    "$name" "$access" "$secret" "$actions"
}

umask 077
{
  echo '{"identities": ['
  identity admin "$S3_ADMIN_ACCESS_KEY" "$S3_ADMIN_SECRET_KEY" Admin Read List Tagging Write
  echo ','
  identity worker "$S3_WORKER_ACCESS_KEY" "$S3_WORKER_SECRET_KEY" \
    "Read:$BUCKET/models/*" "Read:$BUCKET/$PREFIX/*" "Write:$BUCKET/$PREFIX/*" "List:$BUCKET"
  echo ','
  identity producer "$S3_PRODUCER_ACCESS_KEY" "$S3_PRODUCER_SECRET_KEY" \
    "Read:$BUCKET/$PREFIX/*" "Write:$BUCKET/$PREFIX/*" "List:$BUCKET"
  echo
  echo ']}'
} > "$CONFIG"
if id seaweed >/dev/null 2>&1; then chown seaweed:seaweed "$CONFIG"; fi

exec "$SEAWEEDFS_ENTRYPOINT" server -dir=/data -s3 -s3.port=9000 "-s3.config=$CONFIG" "$@"
