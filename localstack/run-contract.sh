#!/usr/bin/env bash
# Run the storage contract suite against an external S3 endpoint (LocalStack,
# MinIO, ...): the "s3-env" variant of tests/storage. See localstack/README.md.
#
#   EBBTIDE_TEST_S3_URL  s3://BUCKET/PREFIX?endpoint=URL&region=R
#                        (default: LocalStack on 127.0.0.1:4566)
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
#                        the endpoint's credentials (default: LocalStack's test/test)
#
# Extra arguments are passed to pytest, e.g. `localstack/run-contract.sh -x -v`.
set -euo pipefail
cd "$(dirname "$0")/.."

export EBBTIDE_TEST_S3_URL="${EBBTIDE_TEST_S3_URL:-s3://ebbtide-contract/suite?endpoint=http://127.0.0.1:4566&region=us-east-1}"
if [[ -z "${AWS_ACCESS_KEY_ID:-}" && -z "${AWS_PROFILE:-}" ]]; then
    export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
fi

echo "storage contract against ${EBBTIDE_TEST_S3_URL}"
exec .venv/bin/python -m pytest -p no:cacheprovider tests/storage -k s3-env "$@"
