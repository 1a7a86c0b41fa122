"""Create a recurring (nightly) thaw run in Kubeflow Pipelines.

    thaw compile --image <registry>/thaw:<tag> --output thaw_pipeline.yaml
    python infra/schedule_example.py --host https://kubeflow.example.com/pipeline \
        --namespace kubeflow-user-example-com --data-uri s3://thaw/datasets/my-images

KFP cron expressions have 6 fields, seconds first: "0 0 3 * * *" is every day at 03:00:00 (UTC).
"""

import argparse

DEFAULT_CRON = "0 0 3 * * *"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=None,
                        help="KFP API endpoint (default: in-cluster / kube config)")
    parser.add_argument("--namespace", default="kubeflow-user-example-com",
                        help="KFP user namespace the runs go to")
    parser.add_argument("--token", default=None, help="bearer token for the KFP API")
    parser.add_argument("--package", default="thaw_pipeline.yaml",
                        help="compiled pipeline (thaw compile)")
    parser.add_argument("--cron", default=DEFAULT_CRON, help="6-field cron, seconds first")
    parser.add_argument("--job-name", default="thaw-nightly")
    parser.add_argument("--experiment", default="thaw")
    parser.add_argument("--data-uri", default="s3://thaw/datasets/fashion-mnist-sample")
    parser.add_argument("--backbone", default="resnet50")
    args = parser.parse_args(argv)
    if len(args.cron.split()) != 6:
        parser.error(f"--cron needs 6 fields (seconds first), got {args.cron!r}")
    return args


def main(argv=None) -> int:
    import kfp

    args = parse_args(argv)
    client = kfp.Client(host=args.host, namespace=args.namespace, existing_token=args.token)
    # returns the existing experiment when one of that name is already there
    experiment = client.create_experiment(args.experiment, namespace=args.namespace)
    recurring = client.create_recurring_run(
        experiment_id=experiment.experiment_id,
        job_name=args.job_name,
        cron_expression=args.cron,
        pipeline_package_path=args.package,
        params={"data_uri": args.data_uri, "backbone": args.backbone},
        max_concurrency=1,  # never two nightly runs at once
        no_catchup=True,  # after a pause, run once instead of once per missed slot
    )
    print(f"recurring run {recurring.recurring_run_id} ({args.job_name}, cron {args.cron!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
