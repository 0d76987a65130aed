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

{{- define "fedlora.workerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "fedlora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: aggregator-worker
{{- end }}

{{/* Sharded aggregation's worker count (config.shards.count; 1: no workers). */}}
{{- define "fedlora.shardCount" -}}
{{- int (default 1 (.Values.config.shards).count) }}
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
{{- if or (hasPrefix "mqtts://" .Values.config.broker.url) (hasPrefix "ssl://" .Values.config.broker.url) }}true{{ end }}
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

{{/* The names of the bundled broker's Service inside the cluster, shortest first. */}}
{{- define "fedlora.brokerHosts" -}}
{{- $b := include "fedlora.brokerName" . }}
{{- $ns := .Release.Namespace }}
{{- list $b (printf "%s.%s" $b $ns) (printf "%s.%s.svc" $b $ns) (printf "%s.%s.svc.cluster.local" $b $ns) | toJson }}
{{- end }}

{{/* Whether the aggregator connects to the bundled broker. */}}
{{- define "fedlora.usesBundledBroker" -}}
{{- if .Values.broker.enabled }}
{{- if not .Values.config.broker.url }}true
{{- else if has (urlParse .Values.config.broker.url).hostname (include "fedlora.brokerHosts" . | fromJsonArray) }}true
{{- end }}
{{- end }}
{{- end }}

{{/* Secret with the bundled broker's certificate: the operator's, or the chart's own. */}}
{{- define "fedlora.brokerTlsSecret" -}}
{{- default (printf "%s-tls" (include "fedlora.brokerName" .)) .Values.broker.tls.existingSecret }}
{{- end }}

{{/* Secret with the CA the aggregator verifies the broker with ('' : the system's). */}}
{{- define "fedlora.caSecret" -}}
{{- if .Values.mqtt.tls.caSecret }}
{{- .Values.mqtt.tls.caSecret }}
{{- else if and (include "fedlora.usesBundledBroker" .) .Values.broker.tls.enabled }}
{{- include "fedlora.brokerTlsSecret" . }}
{{- end }}
{{- end }}

{{/* Key of the CA certificate in that Secret. */}}
{{- define "fedlora.caKey" -}}
{{- if .Values.mqtt.tls.caSecret }}{{ .Values.mqtt.tls.caKey }}{{ else }}ca.crt{{ end }}
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
{{- include "fedlora.validateBroker" . }}
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

{{/* The broker settings that cannot work together. */}}
{{- define "fedlora.validateBroker" -}}
{{- $b := .Values.broker }}
{{- $url := .Values.config.broker.url }}
{{- if and $b.enabled $url (not (include "fedlora.usesBundledBroker" .)) }}
{{- fail (printf "config.broker.url (%s) names an external broker while broker.enabled deploys the bundled one: the devices would log in to a broker the aggregator does not use. Set broker.enabled=false for the external broker, or leave config.broker.url empty for the bundled one" $url) }}
{{- end }}
{{- if and $b.enabled $url (include "fedlora.usesBundledBroker" .) }}
{{- $u := urlParse $url }}
{{- $tls := include "fedlora.brokerTLS" . }}
{{- $port := trimPrefix (printf "%s:" $u.hostname) $u.host }}
{{- if and $tls (not $b.tls.enabled) }}
{{- fail (printf "config.broker.url (%s) is TLS but the bundled broker does not serve TLS (broker.tls.enabled=false)" $url) }}
{{- end }}
{{- if and (not $tls) (not $b.plain) }}
{{- fail (printf "config.broker.url (%s) is plain MQTT but the bundled broker serves only TLS (broker.plain=false): use mqtts://%s:%d" $url $u.hostname (int $b.service.tlsPort)) }}
{{- end }}
{{- $want := ternary $b.service.tlsPort $b.service.port (not (empty $tls)) | int }}
{{- if and $port (ne (int $port) $want) }}
{{- fail (printf "config.broker.url (%s) names port %s, but the bundled broker serves %s on %d" $url $port (ternary "TLS" "plain MQTT" (not (empty $tls))) $want) }}
{{- end }}
{{- end }}
{{- if not $b.enabled }}
{{- if or $b.auth.users $b.auth.existingSecret $b.acl }}
{{- fail "broker.auth.users, broker.auth.existingSecret and broker.acl configure the bundled broker, which is off (broker.enabled=false): configure the accounts and ACL in your external broker (docs/security.md) and remove them here" }}
{{- end }}
{{- else }}
{{- if and $b.auth.allowAnonymous $b.auth.useUsernameAsClientId }}
{{- fail "broker.auth.allowAnonymous=true cannot work with broker.auth.useUsernameAsClientId=true: Mosquitto refuses every client without a user name when it takes client ids from user names. Keep anonymous access off (recommended) or set useUsernameAsClientId=false" }}
{{- end }}
{{- if and $b.tls.requireClientCertificate (not $b.tls.enabled) }}
{{- fail "broker.tls.requireClientCertificate needs broker.tls.enabled: client certificates are checked on the TLS listener" }}
{{- end }}
{{- if and $b.tls.requireClientCertificate $b.plain }}
{{- fail "broker.tls.requireClientCertificate with broker.plain=true: a client would skip the certificate check on the plain listener. Set broker.plain=false" }}
{{- end }}
{{- if and $b.tls.requireClientCertificate (include "fedlora.usesBundledBroker" .) (not .Values.mqtt.tls.clientCertSecret) }}
{{- fail "broker.tls.requireClientCertificate: the aggregator needs a client certificate too. Set mqtt.tls.clientCertSecret to a kubernetes.io/tls Secret signed by the broker's CA" }}
{{- end }}
{{- $aggregator := .Values.mqtt.auth.username }}
{{- range $b.auth.users }}
{{- if and $aggregator (eq .username $aggregator) }}
{{- fail (printf "broker.auth.users has an account named %q, the aggregator's user name (mqtt.auth.username): it would get the aggregator's rights. Give the device another id" .username) }}
{{- end }}
{{- end }}
{{- if and (not $b.acl) (contains "%" .Values.config.job) }}
{{- fail (printf "config.job %q contains %%: the bundled broker's ACL patterns would read %%u or %%c in it as a user name or client id" .Values.config.job) }}
{{- end }}
{{- end }}
{{- if and (or .Values.mqtt.tls.clientCertSecret .Values.mqtt.tls.caSecret) (not (include "fedlora.brokerTLS" .)) }}
{{- fail (printf "mqtt.tls.caSecret / mqtt.tls.clientCertSecret are set but the aggregator connects without TLS (%s): use an mqtts:// URL or remove them" (include "fedlora.brokerUrl" .)) }}
{{- end }}
{{- end }}
