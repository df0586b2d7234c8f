{{/* The release's full name: <release>-sightline, unless the release is already named so. */}}
{{- define "sightline.fullname" -}}
{{- if contains "sightline" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-sightline" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sightline.selectorLabels" -}}
app.kubernetes.io/name: sightline
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sightline.labels" -}}
{{ include "sightline.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/*
Sightline's configuration: `config` from the values, with http.listen set to the chart's port
(the probes and the metrics Service need it on all interfaces).
*/}}
{{- define "sightline.config" -}}
{{- $http := dict "http" (dict "listen" (printf "0.0.0.0:%d" (int .Values.httpPort))) -}}
{{- $config := mergeOverwrite (deepCopy .Values.config) $http -}}
{{- include "sightline.toml.table" (dict "path" "" "table" $config) -}}
{{- end -}}

{{/*
A TOML table: its plain keys first, then its sub-tables ([path.key]) and arrays of tables
([[path.key]]). Helm's own toToml would do, but values arrive as JSON numbers (float64) and
it writes 60000 as 60000.0, which an integer setting refuses: whole numbers are written here
as integers.
*/}}
{{- define "sightline.toml.table" -}}
{{- $path := .path -}}
{{- $table := .table -}}
{{- range $key := keys $table | sortAlpha }}
{{- $value := get $table $key }}
{{- if not (or (kindIs "map" $value) (and (kindIs "slice" $value) $value (kindIs "map" (first $value)))) }}
{{ include "sightline.toml.key" $key }} = {{ include "sightline.toml.value" $value }}
{{- end }}
{{- end }}
{{- range $key := keys $table | sortAlpha }}
{{- $value := get $table $key }}
{{- $sub := ternary (include "sightline.toml.key" $key) (printf "%s.%s" $path (include "sightline.toml.key" $key)) (eq $path "") }}
{{- if kindIs "map" $value }}

[{{ $sub }}]
{{- include "sightline.toml.table" (dict "path" $sub "table" $value) }}
{{- else if and (kindIs "slice" $value) $value (kindIs "map" (first $value)) }}
{{- range $item := $value }}

[[{{ $sub }}]]
{{- include "sightline.toml.table" (dict "path" $sub "table" $item) }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "sightline.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{- define "sightline.toml.value" -}}
{{- if kindIs "slice" . -}}
[{{- range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "sightline.toml.value" $v }}{{- end }}]
{{- else if or (kindIs "float64" .) (kindIs "int64" .) (kindIs "int" .) -}}
{{- if eq (float64 (floor .)) (float64 .) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else if kindIs "bool" . -}}
{{ . }}
{{- else -}}
{{ toJson (toString .) }}
{{- end -}}
{{- end -}}
