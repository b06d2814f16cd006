{{/*
Combinations of values that render valid objects but cannot work on a cluster: refused at
render time with the reason and the way out (values.schema.json checks each value alone).
Included once, from deployment.yaml.
*/}}
{{- define "resnet-serve.checks" -}}
{{- $v := .Values }}
{{- if and (eq $v.model.source "pvc") (not $v.model.pvc.existingClaim) }}
{{- fail "model.source=pvc needs model.pvc.existingClaim" }}
{{- end }}

{{- /* Ports: the service refuses equal ports at start (its Settings validator); say so now. */}}
{{- $metricsPort := int $v.metrics.port }}
{{- if and $v.grpc.enabled (eq (int $v.grpc.port) (int $v.containerPorts.http)) }}
{{- fail (printf "grpc.port %d is containerPorts.http: give gRPC a port of its own" (int $v.grpc.port)) }}
{{- end }}
{{- if and (gt $metricsPort 0) (eq $metricsPort (int $v.containerPorts.http)) }}
{{- fail (printf "metrics.port %d is containerPorts.http: use 0 for /metrics on the HTTP port, or another port" $metricsPort) }}
{{- end }}
{{- if and (gt $metricsPort 0) $v.grpc.enabled (eq $metricsPort (int $v.grpc.port)) }}
{{- fail (printf "metrics.port %d is grpc.port: give /metrics a port of its own (e.g. 9090)" $metricsPort) }}
{{- end }}

{{- /* Probes and scrapes that would be refused by the service's API keys. */}}
{{- if $v.config.apiKeyForProbes }}
{{- fail "config.apiKeyForProbes: the kubelet's httpGet probes send no API key, so every probe would get 401 and the pod would restart forever. /healthz and /readyz reveal only whether the pod is up and ready; leave them open" }}
{{- end }}
{{- $monitored := or $v.metrics.serviceMonitor.enabled $v.metrics.podMonitor.enabled }}
{{- if and $v.metrics.serviceMonitor.enabled $v.metrics.podMonitor.enabled }}
{{- fail "metrics.serviceMonitor and metrics.podMonitor are both enabled: Prometheus would scrape every pod twice and every sum over pods would double. Enable one" }}
{{- end }}
{{- if and $v.config.apiKeyForMetrics (eq $metricsPort 0) }}
{{- if $v.metrics.podAnnotations }}
{{- fail "config.apiKeyForMetrics with /metrics on the HTTP port: annotation-based scrape configs (metrics.podAnnotations) send no API key, so the scrape would get 401. Set metrics.podAnnotations=false and scrape through a monitor with metrics.authorization, or serve /metrics on metrics.port" }}
{{- end }}
{{- if and $monitored (not $v.metrics.authorization.existingSecret) }}
{{- fail "config.apiKeyForMetrics with /metrics on the HTTP port: the monitor needs a key to send. Set metrics.authorization.existingSecret to a Secret holding one of the API keys, or serve /metrics on metrics.port" }}
{{- end }}
{{- end }}

{{- /* A NetworkPolicy that admits the clients but not the scrape. */}}
{{- $scraped := or $monitored $v.metrics.podAnnotations }}
{{- if and $v.networkPolicy.enabled $v.networkPolicy.ingressFrom (eq $metricsPort 0) $scraped (not $v.networkPolicy.metricsFrom) }}
{{- fail "networkPolicy.ingressFrom restricts the HTTP port, where /metrics is served (metrics.port 0), so Prometheus could not scrape. Set metrics.port (networkPolicy.metricsFrom then opens that port alone), or list Prometheus' peers in networkPolicy.metricsFrom (they then reach the whole HTTP port)" }}
{{- end }}

{{- /* The exported package must hold the variant the server is asked to serve. */}}
{{- if eq $v.model.source "export" }}
{{- $served := default (include "resnet-serve.imagePrecision" .) $v.config.precision }}
{{- $exported := include "resnet-serve.exportPrecision" . }}
{{- if and (ne $served "fp32") (ne $served $exported) }}
{{- fail (printf "the server would serve %s (config.precision, or the image's default) but the init container exports only fp32 and %s (model.export.precision): the server would fall back to fp32. Make them agree" $served $exported) }}
{{- end }}
{{- end }}
{{- end }}
