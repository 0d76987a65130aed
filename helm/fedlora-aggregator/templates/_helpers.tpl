{{/* Names, labels and the few derived values every template shares. */}}

{{- define "fedlora.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fedlora.fullname" -}}
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

{{- define "fedlora.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fedlora.labels" -}}
helm.sh/chart: {{ include "fedlora.chart" . }}
app.kubernetes.io/name: {{ include "fedlora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedlora
{{- end }}

{{- define "fedlora.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedlora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: aggregator
{{- end }}

{{- define "fedlora.broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedlora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: broker
{{- end }}

{{- define "fedlora.brokerName" -}}
{{- printf "%s-broker" (include "fedlora.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fedlora.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fedlora.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "fedlora.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Lease all replicas campaign for (one per release). */}}
{{- define "fedlora.leaseName" -}}
{{- include "fedlora.fullname" . }}
{{- end }}

{{/* The Prometheus job label of the aggregator: a ServiceMonitor names it after the Service. */}}
{{- define "fedlora.metricsJob" -}}
{{- include "fedlora.fullname" . }}
{{- end }}

{{/* Secret with the aggregator's MQTT credentials (and the bundled broker's password file). */}}
{{- define "fedlora.mqttSecretName" -}}
{{- if .Values.mqtt.auth.existingSecret }}
{{- .Values.mqtt.auth.existingSecret }}
{{- else }}
{{- printf "%s-mqtt" (include "fedlora.fullname" .) }}
{{- end }}
{{- end }}

{{/* Whether the aggregator sends MQTT credentials at all. */}}
{{- define "fedlora.mqttAuth" -}}
{{- if or .Values.mqtt.auth.existingSecret (and .Values.mqtt.auth.username (or .Values.mqtt.auth.password .Values.broker.enabled)) }}true{{- end }}
{{- end }}

{{/* The aggregator's MQTT password when the chart makes the Secret: the value, else the one
     a previous release stored (so upgrades keep it), else a new random one. */}}
{{- define "fedlora.mqttPassword" -}}
{{- if .Values.mqtt.auth.password }}
{{- .Values.mqtt.auth.password }}
{{- else }}
{{- $old := lookup "v1" "Secret" .Release.Namespace (printf "%s-mqtt" (include "fedlora.fullname" .)) }}
{{- if and $old $old.data (hasKey $old.data "password") }}
{{- index $old.data "password" | b64dec }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}
{{- end }}

{{/* Whether the aggregator talks TLS to the broker. */}}
{{- define "fedlora.brokerTLS" -}}
{{- if .Values.config.broker.url }}
{{- if hasPrefix "mqtts://" .Values.config.broker.url }}true{{ end }}
{{- else if and .Values.broker.enabled .Values.broker.tls.enabled }}true{{- end }}
{{- end }}

{{- define "fedlora.brokerUrl" -}}
{{- if .Values.config.broker.url }}
{{- .Values.config.broker.url }}
{{- else if .Values.broker.tls.enabled }}
{{- printf "mqtts://%s:%d" (include "fedlora.brokerName" .) (int .Values.broker.service.tlsPort) }}
{{- else }}
{{- printf "mqtt://%s:%d" (include "fedlora.brokerName" .) (int .Values.broker.service.port) }}
{{- end }}
{{- end }}

{{/* Secret with the CA the aggregator verifies the broker with ('' : the system's). */}}
{{- define "fedlora.caSecret" -}}
{{- if .Values.mqtt.tls.caSecret }}
{{- .Values.mqtt.tls.caSecret }}
{{- else if and .Values.broker.enabled .Values.broker.tls.enabled (not .Values.config.broker.url) }}
{{- .Values.broker.tls.existingSecret }}
{{- end }}
{{- end }}

{{/* Checks that span several values (the schema checks each value alone). */}}
{{- define "fedlora.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicaCount > 1 needs leaderElection.enabled: without it every replica would run rounds" }}
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) .Values.persistence.enabled (not .Values.persistence.existingClaim) (not (has "ReadWriteMany" .Values.persistence.accessModes)) }}
{{- fail "replicaCount > 1 needs a volume every replica can mount: set persistence.accessModes to [ReadWriteMany] (an RWX storage class) or persistence.existingClaim" }}
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.persistence.enabled) }}
{{- fail "replicaCount > 1 needs persistence.enabled: a standby resumes from the persisted state" }}
{{- end }}
{{- if not (lt (float64 .Values.leaderElection.renewDeadline) (float64 .Values.leaderElection.leaseDuration)) }}
{{- fail "leaderElection.renewDeadline must be less than leaderElection.leaseDuration" }}
{{- end }}
{{- if not (lt (float64 .Values.leaderElection.retryPeriod) (float64 .Values.leaderElection.renewDeadline)) }}
{{- fail "leaderElection.retryPeriod must be less than leaderElection.renewDeadline" }}
{{- end }}
{{- if and (not .Values.config.broker.url) (not .Values.broker.enabled) }}
{{- fail "set config.broker.url to your broker, or broker.enabled=true for the bundled Mosquitto" }}
{{- end }}
{{- if and .Values.broker.enabled .Values.broker.tls.enabled (not .Values.broker.tls.existingSecret) }}
{{- fail "broker.tls.enabled needs broker.tls.existingSecret (a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt)" }}
{{- end }}
{{- if and .Values.broker.enabled (not .Values.broker.plain) (not .Values.broker.tls.enabled) }}
{{- fail "the bundled broker needs a listener: broker.plain or broker.tls.enabled" }}
{{- end }}
{{- if and (not .Values.bundle.image.repository) (not .Values.bundle.existingClaim) }}
{{- fail "the aggregator needs its artifact bundle: set bundle.existingClaim or bundle.image.repository" }}
{{- end }}
{{- end }}

{{/* Secret whose key `passwords` holds the bundled broker's plain-text password file. */}}
{{- define "fedlora.brokerPasswordSecret" -}}
{{- if .Values.broker.auth.existingSecret }}
{{- .Values.broker.auth.existingSecret }}
{{- else if .Values.mqtt.auth.existingSecret }}
{{- printf "%s-broker-passwords" (include "fedlora.fullname" .) }}
{{- else }}
{{- printf "%s-mqtt" (include "fedlora.fullname" .) }}
{{- end }}
{{- end }}
