"""Ray job entrypoints: ``ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml
-- python -m jobs.<name> CONFIG``. Store location and credentials come from the cluster's
environment (STGRAY_STORE, STGRAY_S3_ENDPOINT, AWS_* or an instance profile), never from
the command line. Submitting a job twice resumes: finished stages are found in the store."""
