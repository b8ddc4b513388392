{{/* An image reference from {repository, tag}; an empty tag is the chart's appVersion. */}}
{{- define "ferry.image" -}}
{{- $img := index . 0 -}}{{- $chart := index . 1 -}}
{{- printf "%s:%s" $img.repository (default $chart.AppVersion $img.tag) -}}
{{- end -}}

{{/* The labels every object of the chart carries. */}}
{{- define "ferry.labels" -}}
app.kubernetes.io/part-of: ferry
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
