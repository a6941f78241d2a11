{{/*
Pod template of a Ray node, shared by the head and the worker groups.
Call with (dict "context" $ "role" "head"|"worker" "name" <group name> "group" <its values>).
*/}}
{{- define "qzoom.rayPodTemplate" -}}
{{- $ := .context -}}
{{- $v := $.Values -}}
{{- $group := .group -}}
{{- $head := eq .role "head" -}}
metadata:
  labels:
    {{- include "qzoom.labels" $ | nindent 4 }}
    app.kubernetes.io/component: ray-{{ .role }}
    {{- with $group.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with include "qzoom.annotations" (dict "extra" $group.podAnnotations "context" $) }}
  annotations:
    {{- . | nindent 4 }}
  {{- end }}
spec:
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  containers:
    - name: ray-{{ .role }}
      image: {{ include "qzoom.image" $ | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      ports:
        {{- if $head }}
        - name: gcs-server
          containerPort: 6379
          protocol: TCP
        - name: dashboard
          containerPort: 8265
          protocol: TCP
        - name: client
          containerPort: 10001
          protocol: TCP
        {{- end }}
        - name: serve
          containerPort: {{ $v.serve.http.port | int }}
          protocol: TCP
        - name: serve-grpc
          containerPort: {{ $v.serve.grpc.port | int }}
          protocol: TCP
        - name: metrics
          containerPort: 8080
          protocol: TCP
      env:
        - name: HOME
          value: /home/ray
        - name: XDG_CACHE_HOME
          value: /home/ray/.cache
        - name: HF_HOME
          value: /home/ray/.cache/huggingface
        - name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
          value: {{ include "qzoom.grpcMessageLimit" $ | quote }}
        {{- if $v.model.pvc.claimName }}
        # Weights are local: never reach for the hub.
        - name: HF_HUB_OFFLINE
          value: "1"
        {{- end }}
        - name: QZOOM_REDIS_URL
          valueFrom:
            secretKeyRef:
              name: {{ include "qzoom.redis.fullname" $ }}
              key: redis-url
        {{- if $v.auth.enabled }}
        - name: QZOOM_API_KEYS
          valueFrom:
            secretKeyRef:
              name: {{ include "qzoom.apiKeys.secretName" $ }}
              key: {{ include "qzoom.apiKeys.secretKey" $ }}
        {{- end }}
        {{- with $v.model.hfToken.existingSecret }}
        - name: HF_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ . }}
              key: {{ $v.model.hfToken.key }}
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- $resources := deepCopy ($group.resources | default (dict)) }}
        {{- if and (not $head) (gt (float64 ($group.gpus | default 0)) 0.0) }}
        {{- $limits := $resources.limits | default (dict) }}
        {{- $_ := set $limits "nvidia.com/gpu" ($group.gpus | int) }}
        {{- $_ := set $resources "limits" $limits }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      {{- if and (not $head) $v.probes.readiness.enabled }}
      # grpc.health.v1 through this pod's Serve proxy (routed to the app's ingress): Ready while it answers SERVING.
      # The head keeps KubeRay's own probes: the operator reaches its dashboard before any app runs.
      readinessProbe:
        grpc:
          port: {{ $v.serve.grpc.port | int }}
          service: qzoom.v1.QZoomService
        periodSeconds: {{ $v.probes.readiness.periodSeconds | int }}
        timeoutSeconds: {{ $v.probes.readiness.timeoutSeconds | int }}
        failureThreshold: {{ $v.probes.readiness.failureThreshold | int }}
      {{- end }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: ray-session
          mountPath: /tmp/ray
        - name: dshm
          mountPath: /dev/shm
        - name: cache
          mountPath: /home/ray/.cache
        {{- if and (not $head) $v.model.pvc.claimName }}
        - name: model
          mountPath: {{ $v.model.pvc.mountPath }}
          {{- with $v.model.pvc.subPath }}
          subPath: {{ . }}
          {{- end }}
          readOnly: true
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: {{ $v.tmpSizeLimit }}
    - name: ray-session
      emptyDir:
        sizeLimit: {{ $v.raySessionSizeLimit }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $group.shmSizeLimit | default "2Gi" }}
    - name: cache
      emptyDir:
        sizeLimit: {{ $v.model.cacheSizeLimit }}
    {{- if and (not $head) $v.model.pvc.claimName }}
    - name: model
      persistentVolumeClaim:
        claimName: {{ $v.model.pvc.claimName }}
        readOnly: true
    {{- end }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
