# MLflow tracking server + model registry for thaw (infra/base/mlflow.yaml).
# The upstream image lacks the PostgreSQL driver and boto3 (S3/MinIO artifacts).
#   docker build -f infra/mlflow.Dockerfile -t <registry>/thaw-mlflow:v3.17.2 infra
#   docker push <registry>/thaw-mlflow:v3.17.2
# then replace REGISTRY under `images:` in infra/base/kustomization.yaml (or override it in an overlay).
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary boto3
EXPOSE 5000
