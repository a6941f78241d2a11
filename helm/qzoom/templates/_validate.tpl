{{/*
Checks across values that values.schema.json cannot express; each failure names the keys to change.
Included once, from rayservice.yaml.
*/}}
{{- define "qzoom.validateValues" -}}
{{- $v := .Values -}}

{{- /* Model: a hub id or a PVC with local weights. */ -}}
{{- if and (not $v.model.id) (not $v.model.pvc.claimName) -}}
{{- fail "model: no model given. Set model.id (a Hugging Face hub id, e.g. YuhengSSS/Q-Zoom-Qwen2.5VL-7B) or model.pvc.claimName (a PVC holding the weights, mounted at model.pvc.mountPath)." -}}
{{- end -}}

{{- /* Redis: exactly one source of the shared feature cache. */ -}}
{{- if and $v.redis.builtin.enabled $v.redis.external.enabled -}}
{{- fail "redis: both redis.builtin.enabled and redis.external.enabled are true. Enable exactly one: the built-in Redis Deployment, or your own Redis at redis.external.url." -}}
{{- end -}}
{{- if not (or $v.redis.builtin.enabled $v.redis.external.enabled) -}}
{{- fail "redis: neither redis.builtin.enabled nor redis.external.enabled is true. Enable exactly one: the built-in Redis Deployment, or your own Redis at redis.external.url." -}}
{{- end -}}
{{- if and $v.redis.external.enabled (not $v.redis.external.url) -}}
{{- fail "redis: redis.external.enabled is true but redis.external.url is empty. Set it to redis://[:PASSWORD@]HOST:PORT/DB." -}}
{{- end -}}

{{- /* API keys: enabled auth needs keys to check. */ -}}
{{- if and $v.auth.enabled (not $v.auth.existingSecret) (not $v.auth.apiKeys) -}}
{{- fail "auth: auth.enabled is true but there are no keys. Set auth.apiKeys (a list) or auth.existingSecret (a Secret with comma-separated keys under auth.existingSecretKey)." -}}
{{- end -}}

{{- /* extraArgs may not shadow the args the chart sets from their own keys. */ -}}
{{- $own := list "model" "device" "dtype" "redis_url" "redis_url_env" "cache_ttl_s" "api_keys_env" "max_batch_size" "batch_wait_timeout_s" -}}
{{- range $key, $_ := $v.serve.extraArgs -}}
{{- if has $key $own -}}
{{- fail (printf "serve.extraArgs.%s: the chart sets %s from its own values (model.*, serve.*, redis.*, auth.*); remove it from serve.extraArgs." $key $key) -}}
{{- end -}}
{{- end -}}

{{- /* The zoom pool exists for its GPUs. */ -}}
{{- if and $v.workerGroups.zoom.enabled (lt (float64 $v.workerGroups.zoom.gpus) 1.0) -}}
{{- fail (printf "workerGroups.zoom: the zoom pool is enabled with %v GPUs. Set workerGroups.zoom.gpus to at least 1 (Zoom replicas need a whole GPU), or disable the pool with workerGroups.zoom.enabled=false." $v.workerGroups.zoom.gpus) -}}
{{- end -}}

{{- /* Worker group sizes. */ -}}
{{- range $name, $group := $v.workerGroups -}}
{{- if $group.enabled -}}
{{- if or (gt (int $group.minReplicas) (int $group.replicas)) (gt (int $group.replicas) (int $group.maxReplicas)) -}}
{{- fail (printf "workerGroups.%s: need minReplicas <= replicas <= maxReplicas, got %v <= %v <= %v." $name $group.minReplicas $group.replicas $group.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* Deployments: autoscaling bounds, and the pool each one is pinned to must exist and fit a replica. */ -}}
{{- range $key, $d := $v.serve.deployments -}}
{{- if gt (int $d.autoscaling.minReplicas) (int $d.autoscaling.maxReplicas) -}}
{{- fail (printf "serve.deployments.%s.autoscaling: minReplicas (%v) is larger than maxReplicas (%v)." $key $d.autoscaling.minReplicas $d.autoscaling.maxReplicas) -}}
{{- end -}}
{{- with $d.workerGroup -}}
{{- $group := (index $v.workerGroups .) | default (dict) -}}
{{- if not $group.enabled -}}
{{- fail (printf "serve.deployments.%s.workerGroup is %q, which is not an enabled worker group. Enable workerGroups.%s, or set serve.deployments.%s.workerGroup to \"\" to let Ray place the replicas anywhere." $key . . $key) -}}
{{- end -}}
{{- if lt (float64 $group.gpus) (float64 $d.numGpus) -}}
{{- fail (printf "serve.deployments.%s: a replica needs %v GPUs but its worker group %q has %v per pod. Raise workerGroups.%s.gpus or lower serve.deployments.%s.numGpus." $key $d.numGpus . $group.gpus . $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
