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
{{- $fullname := include "sightline.fullname" . -}}
{{- $chart := dict "http" (dict "listen" (printf "0.0.0.0:%d" (int .Values.httpPort))) -}}
{{- if gt (int .Values.replicas) 1 -}}
{{- /* Every process: its pod's stable name behind the headless Service; each process finds
       its own index in its host name (the pod's name, ending in -<ordinal>). */ -}}
{{- $processes := list -}}
{{- range $i := until (int .Values.replicas) -}}
{{- $processes = append $processes (printf "%s-%d.%s-headless.%s.svc.%s:%d" $fullname $i $fullname $.Release.Namespace $.Values.cluster.domain (int $.Values.cluster.port)) -}}
{{- end -}}
{{- $_ := set $chart "cluster" (dict "processes" $processes "listen" (printf "0.0.0.0:%d" (int .Values.cluster.port)) "connect-timeout-ms" (int .Values.cluster.connectTimeoutMs)) -}}
{{- end -}}
{{- $kafka := dict -}}
{{- with .Values.kafka.tls.existingSecret -}}
{{- $tls := dict "ssl.ca.location" (printf "/etc/sightline/kafka-tls/%s" $.Values.kafka.tls.caKey) -}}
{{- /* Mutual TLS: the client's certificate and key from the same Secret, when named. */ -}}
{{- with $.Values.kafka.tls.certKey -}}
{{- $_ := set $tls "ssl.certificate.location" (printf "/etc/sightline/kafka-tls/%s" .) -}}
{{- end -}}
{{- with $.Values.kafka.tls.keyKey -}}
{{- $_ := set $tls "ssl.key.location" (printf "/etc/sightline/kafka-tls/%s" .) -}}
{{- end -}}
{{- $_ := set $kafka "options" $tls -}}
{{- end -}}
{{- with .Values.kafka.sasl.existingSecret -}}
{{- $_ := set $kafka "option-files" (dict "sasl.password" (printf "/etc/sightline/kafka-sasl/%s" $.Values.kafka.sasl.passwordKey)) -}}
{{- end -}}
{{- if $kafka -}}
{{- $_ := set $chart "kafka" $kafka -}}
{{- end -}}
{{- $config := mergeOverwrite (deepCopy .Values.config) $chart -}}
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
