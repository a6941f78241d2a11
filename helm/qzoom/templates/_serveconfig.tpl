{{/*
The Ray Serve config (ServeDeploySchema) that becomes the RayService's serveConfigV2: the same
application, deployments and servicer function as configs/serve-gpu.yaml, filled from values.
Scalars go through toJson, so strings are quoted and numbers never print in exponent form.
*/}}
{{- define "qzoom.serveConfig" -}}
{{- $serve := .Values.serve -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ $serve.http.port | int }}
grpc_options:
  port: {{ $serve.grpc.port | int }}
  grpc_servicer_functions:
    - qzoom_client._proto.qzoom.v1.qzoom_pb2_grpc.add_QZoomServiceServicer_to_server
    - grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server
  request_timeout_s: {{ $serve.grpc.requestTimeoutS | toJson }}
  enable_reflection: {{ $serve.grpc.enableReflection | toJson }}
applications:
  - name: qzoom
    route_prefix: /qzoom
    import_path: qzoom_service.serve.app:build_app
    args:
      model: {{ include "qzoom.modelRef" . | toJson }}
      device: {{ $serve.device | toJson }}
      dtype: {{ $serve.dtype | toJson }}
      redis_url_env: QZOOM_REDIS_URL
      cache_ttl_s: {{ $serve.cacheTtlS | int }}
      api_keys_env: QZOOM_API_KEYS
      max_batch_size: {{ $serve.maxBatchSize | int }}
      batch_wait_timeout_s: {{ $serve.batchWaitTimeoutS | toJson }}
      {{- with $serve.extraArgs }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    deployments:
      {{- range $key, $name := dict "coarseGate" "CoarseGate" "zoom" "Zoom" }}
      {{- $d := index $serve.deployments $key }}
      - name: {{ $name }}
        ray_actor_options:
          num_cpus: {{ $d.numCpus | toJson }}
          num_gpus: {{ $d.numGpus | toJson }}
          {{- with $d.workerGroup }}
          resources: {{ dict (include "qzoom.poolResource" .) 0.001 | toJson }}
          {{- end }}
        max_ongoing_requests: {{ $d.maxOngoingRequests | int }}
        max_queued_requests: {{ $d.maxQueuedRequests | int }}
        autoscaling_config:
          min_replicas: {{ $d.autoscaling.minReplicas | int }}
          max_replicas: {{ $d.autoscaling.maxReplicas | int }}
          target_ongoing_requests: {{ $d.autoscaling.targetOngoingRequests | toJson }}
      {{- end }}
{{- end -}}

{{/*
The gRPC proxy's message limit in bytes: the largest accepted image (EngineConfig.max_image_bytes, 32 MiB
unless extraArgs sets max_image_bytes) plus 1 MiB of framing (qzoom_service.serve.settings.grpc_message_limit).
Ray 2.60 reads it only from RAY_SERVE_GRPC_MAX_MESSAGE_SIZE on every node; larger messages are refused unread.
*/}}
{{- define "qzoom.grpcMessageLimit" -}}
{{- add (int (dig "max_image_bytes" 33554432 .Values.serve.extraArgs)) 1048576 -}}
{{- end -}}
