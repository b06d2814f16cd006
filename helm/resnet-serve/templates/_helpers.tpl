{{/* Names and labels, as helm create and the prometheus-community charts write them. */}}

{{- define "resnet-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "resnet-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "resnet-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "resnet-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "resnet-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "resnet-serve.labels" -}}
helm.sh/chart: {{ include "resnet-serve.chart" . }}
{{ include "resnet-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "resnet-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "resnet-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The server image: tag <appVersion>-cpu or -gpu unless set; a digest wins. */}}
{{- define "resnet-serve.image" -}}
{{- $flavor := ternary "gpu" "cpu" .Values.gpu.enabled }}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion $flavor) .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "resnet-serve.exportImage" -}}
{{- $repository := default .Values.image.repository .Values.model.export.image.repository }}
{{- $tag := default (printf "%s-export" .Chart.AppVersion) .Values.model.export.image.tag }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/* The package directory the server loads. */}}
{{- define "resnet-serve.modelDir" -}}
{{- if and (eq .Values.model.source "pvc") .Values.model.pvc.subPath }}
{{- printf "/models/%s/%s" (trimAll "/" .Values.model.pvc.subPath) .Values.model.name }}
{{- else }}
{{- printf "/models/%s" .Values.model.name }}
{{- end }}
{{- end }}

{{/*
One setting value as an environment variable string: lists comma separated, whole numbers
without an exponent (YAML numbers reach templates as float64: 67108864 would print as
6.7108864e+07).
*/}}
{{- define "resnet-serve.envValue" -}}
{{- if kindIs "slice" . }}
{{- $items := list }}
{{- range . }}{{ $items = append $items (include "resnet-serve.envValue" .) }}{{ end }}
{{- join "," $items }}
{{- else if and (kindIs "float64" .) (eq (floor .) .) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/* terminationGracePeriodSeconds: preStop sleep + the service's drain deadline + margin. */}}
{{- define "resnet-serve.terminationGracePeriodSeconds" -}}
{{- add (int .Values.drain.preStopSleepSeconds) (ceil .Values.config.shutdownGraceS | int) (int .Values.drain.extraSeconds) }}
{{- end }}

{{/* PromQL label matchers for this release's pods. */}}
{{- define "resnet-serve.promSelector" -}}
{{- default (printf "namespace=%q, pod=~%q" .Release.Namespace (printf "%s-.*" (include "resnet-serve.fullname" .))) .Values.autoscaling.keda.selector }}
{{- end }}

{{/* The metric port's name: the HTTP port unless metrics.port is set. */}}
{{- define "resnet-serve.metricsPortName" -}}
{{- ternary "metrics" "http" (gt (int .Values.metrics.port) 0) }}
{{- end }}

{{/* The variant the image serves when config.precision is null (the Dockerfile's ENV). */}}
{{- define "resnet-serve.imagePrecision" -}}
{{- ternary "fp16" "int8" .Values.gpu.enabled }}
{{- end }}

{{/* The variant the export init container builds beside fp32: the image's unless set. */}}
{{- define "resnet-serve.exportPrecision" -}}
{{- default (include "resnet-serve.imagePrecision" .) .Values.model.export.precision }}
{{- end }}

{{/* Whether the export init container passes --arch: not with --hf-dir (config.json names
the architecture, and resnet-export refuses both), nor when model.export.arch is empty. */}}
{{- define "resnet-serve.exportPassesArch" -}}
{{- $hf := false }}
{{- range .Values.model.export.sourceArgs }}
{{- if or (eq . "--hf-dir") (hasPrefix "--hf-dir=" .) }}{{ $hf = true }}{{ end }}
{{- end }}
{{- if and .Values.model.export.arch (not $hf) }}true{{ end }}
{{- end }}

{{/* A PodDisruptionBudget protects only where more than one pod can run. */}}
{{- define "resnet-serve.pdbUseful" -}}
{{- if .Values.autoscaling.enabled }}
{{- if gt (int .Values.autoscaling.maxReplicas) 1 }}true{{ end }}
{{- else if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{/* Front-end processes: config.workers, else the most the service's own rule starts (one
per CPU of the CPU limit, 1 to 8; service/cpus.py auto_workers; where it chooses one process
instead, service/layout.py, the room is left unused). */}}
{{- define "resnet-serve.workers" -}}
{{- if not (kindIs "invalid" .Values.config.workers) }}
{{- int .Values.config.workers }}
{{- else }}
{{- $cpu := toString (dig "limits" "cpu" "1" .Values.resources) }}
{{- $cpus := 1 }}
{{- if hasSuffix "m" $cpu }}
{{- $cpus = div (int (trimSuffix "m" $cpu)) 1000 }}
{{- else }}
{{- $cpus = int (floor (float64 $cpu)) }}
{{- end }}
{{- max 1 (min 8 $cpus) }}
{{- end }}
{{- end }}

{{/* /dev/shm for the front-ends' arenas, in MiB, as the server computes the room it
checks at start (service/channel/arena.py arena_bytes): per front-end, every image the
server admits at once (queue + 4 batches) as pixels with their outputs, plus its share of
maxBufferedBytes (at least one body), each block 64-byte aligned; 1 MiB spare. */}}
{{- define "resnet-serve.shmMiB" -}}
{{- $c := .Values.config }}
{{- $queue := int64 (default 256 $c.maxQueueSize) }}
{{- $batch := int64 (default 8 $c.maxBatchSize) }}
{{- $buffered := int64 (default 268435456 $c.maxBufferedBytes) }}
{{- $body := int64 (default 67108864 $c.maxBodyBytes) }}
{{- $workers := int64 (include "resnet-serve.workers" .) }}
{{- $image := mul (div (add (int64 .Values.shm.imageBytes) 63) 64) 64 }}
{{- $outputs := mul (div (add (int64 .Values.shm.outputBytes) 63) 64) 64 }}
{{- $perImage := add $image $outputs }}
{{- $images := add $queue (mul 4 $batch) }}
{{- $share := max (div $buffered (max $workers 1)) $body }}
{{- $total := mul (max $workers 1) (add (mul $images $perImage) $share 64) }}
{{- add (div (add $total 1048575) 1048576) 1 }}
{{- end }}
