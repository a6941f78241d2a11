{{/* vim: set filetype=mustache: */}}
{{/*
Expand the name of the chart.
*/}}
{{- define "qzoom.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name, the prefix of every object name. Cut to 47 characters: KubeRay rejects
longer RayService names (it appends a 6-character suffix to name the RayCluster).
*/}}
{{- define "qzoom.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "qzoom.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selector labels: stable across upgrades, so they are safe in Service and NetworkPolicy selectors.
*/}}
{{- define "qzoom.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qzoom.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
Common labels of every object.
*/}}
{{- define "qzoom.labels" -}}
helm.sh/chart: {{ include "qzoom.chart" . }}
{{ include "qzoom.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Annotations of an object: commonAnnotations plus the object's own (which win); empty when none.
Use: {{- with include "qzoom.annotations" (dict "extra" .Values.x "context" $) }} annotations: {{- . | nindent 4 }} {{- end }}
*/}}
{{- define "qzoom.annotations" -}}
{{- $all := merge (dict) (.extra | default (dict)) (.context.Values.commonAnnotations | default (dict)) -}}
{{- with $all -}}
{{- toYaml . -}}
{{- end -}}
{{- end -}}

{{/*
Image of the Ray containers.
*/}}
{{- define "qzoom.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/*
Names of the objects besides the RayService.
*/}}
{{- define "qzoom.redis.fullname" -}}
{{- printf "%s-redis" (include "qzoom.fullname" .) -}}
{{- end -}}

{{- define "qzoom.apiKeys.secretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-api-keys" (include "qzoom.fullname" .)) -}}
{{- end -}}

{{- define "qzoom.apiKeys.secretKey" -}}
{{- if .Values.auth.existingSecret -}}
{{- .Values.auth.existingSecretKey -}}
{{- else -}}
api-keys
{{- end -}}
{{- end -}}

{{/*
The built-in Redis password: the value given, else the one already stored in the release's Secret
(lookup, on install/upgrade against a cluster), else a fresh random one. The result is memoized in
.Values so the Secret and the serve config's redis_url, rendered by different templates, agree.
*/}}
{{- define "qzoom.redis.password" -}}
{{- $builtin := .Values.redis.builtin -}}
{{- if not $builtin.password -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "qzoom.redis.fullname" .) -}}
{{- if and $existing $existing.data (index $existing.data "redis-password") -}}
{{- $_ := set $builtin "password" (index $existing.data "redis-password" | b64dec) -}}
{{- else -}}
{{- $_ := set $builtin "password" (randAlphaNum 32) -}}
{{- end -}}
{{- end -}}
{{- $builtin.password -}}
{{- end -}}

{{/*
The app's redis_url: the external URL, or the built-in Redis Service with its password.
*/}}
{{- define "qzoom.redisUrl" -}}
{{- if .Values.redis.external.enabled -}}
{{- .Values.redis.external.url -}}
{{- else -}}
{{- printf "redis://:%s@%s.%s.svc:%d/%d" (include "qzoom.redis.password" . | urlquery) (include "qzoom.redis.fullname" .) .Release.Namespace (int .Values.redis.builtin.port) (int .Values.redis.builtin.database) -}}
{{- end -}}
{{- end -}}

{{/*
The app's model argument: the mounted PVC path when a claim is set, else the hub id.
*/}}
{{- define "qzoom.modelRef" -}}
{{- if .Values.model.pvc.claimName -}}
{{- .Values.model.pvc.mountPath -}}
{{- else -}}
{{- .Values.model.id -}}
{{- end -}}
{{- end -}}

{{/*
Custom Ray resource a worker group advertises so a deployment can be pinned to it.
*/}}
{{- define "qzoom.poolResource" -}}
{{- printf "qzoom-pool-%s" . -}}
{{- end -}}
