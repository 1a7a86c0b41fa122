# MLflow tracking server + model registry for thaw (infra/mlflow.yaml).
# The upstream image lacks the PostgreSQL driver and boto3 (S3/MinIO artifacts).
#   docker build -f infra/mlflow.Dockerfile -t <registry>/thaw-mlflow:v3.17.2 infra
#   docker push <registry>/thaw-mlflow:v3.17.2   # then set that image in infra/mlflow.yaml
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary boto3
EXPOSE 5000
