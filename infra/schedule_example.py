"""Moved: recurring (nightly) runs are `thaw schedule create|list|pause|resume|delete`.

    thaw schedule create nightly --cron "0 0 3 * * *" --config my-cluster.yaml \
        --param data_uri=s3://thaw/datasets/my-images --namespace kubeflow-user-example-com

`thaw schedule --help` has the rest (6-field cron, pinned pipeline version, max_concurrency
1, no catch-up, idempotent by name).
"""

import sys

if __name__ == "__main__":
    print(__doc__, file=sys.stderr)
    raise SystemExit(2)
