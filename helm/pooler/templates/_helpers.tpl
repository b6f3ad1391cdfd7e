{{/*
Named templates. Every one takes a context with .Values (this chart's values)
and .Release, and nothing else, so that an application's chart can call them
with this chart's values as a subchart:
  include "pooler.sidecarContainers" (dict "Values" .Values.pooler "Release" .Release)
*/}}

{{/* The base name of every object: <release>-pooler, or fullnameOverride. */}}
{{- define "pooler.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (default "pooler" .Values.nameOverride) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pooler.selectorLabels" -}}
app.kubernetes.io/name: {{ default "pooler" .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pooler.labels" -}}
{{ include "pooler.selectorLabels" . }}
app.kubernetes.io/component: connection-pooler
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Values.image.tag | quote }}
{{- with .Chart }}
helm.sh/chart: {{ printf "%s-%s" .Name .Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end -}}

{{/* The pooler config file: a plain toYaml of .Values.config, nothing added. */}}
{{- define "pooler.config" -}}
{{ toYaml .Values.config }}
{{- end -}}

{{/* Pod annotations: scrape hints and the config checksum (see rolloutOnConfigChange). */}}
{{- define "pooler.podAnnotations" -}}
{{- if .Values.rolloutOnConfigChange }}
checksum/pooler-config: {{ include "pooler.config" . | sha256sum }}
{{- end }}
{{- if and .Values.sidecar.enabled .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ include "pooler.scrapePort" . | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Where Prometheus scrapes: the metrics-only port (metrics.dedicatedPort, named
`metrics`, 9127 as CloudNativePG's pooler) or else the sidecar's main port
(named `sidecar`). "pooler.scrapePortName" is the container port's name.
*/}}
{{- define "pooler.scrapePortName" -}}
{{- if .Values.metrics.dedicatedPort.enabled -}}metrics{{- else -}}sidecar{{- end -}}
{{- end -}}

{{- define "pooler.scrapePort" -}}
{{- if .Values.metrics.dedicatedPort.enabled -}}
{{- if eq (int .Values.metrics.dedicatedPort.port) (int .Values.sidecar.port) -}}
{{- fail "metrics.dedicatedPort.port must differ from sidecar.port" -}}
{{- end -}}
{{- .Values.metrics.dedicatedPort.port -}}
{{- else -}}
{{- .Values.sidecar.port -}}
{{- end -}}
{{- end -}}

{{/*
The managed pools (config.pools) that get a connection Secret, comma-separated:
connectionSecrets.enabled (null: on in standalone mode), overridden per pool by
connectionSecrets.pools.<pool>.enabled.
*/}}
{{- define "pooler.connectionSecretPools" -}}
{{- $cs := .Values.connectionSecrets }}
{{- $on := eq .Values.mode "standalone" }}
{{- if not (kindIs "invalid" $cs.enabled) }}{{ $on = $cs.enabled }}{{ end }}
{{- $names := list }}
{{- range $name, $_ := .Values.config.pools }}
{{- $over := get ($cs.pools | default dict) $name | default dict }}
{{- $enabled := $on }}
{{- if hasKey $over "enabled" }}{{ $enabled = $over.enabled }}{{ end }}
{{- if $enabled }}{{ $names = append $names $name }}{{ end }}
{{- end }}
{{- join "," $names }}
{{- end -}}

{{/* A pool's connection Secret's name; takes (list $ poolName). */}}
{{- define "pooler.connectionSecretName" -}}
{{- $ctx := index . 0 }}{{ $name := index . 1 -}}
{{- printf "%s-%s" (include "pooler.fullname" $ctx) ($name | lower | replace "_" "-") | trunc 253 | trimSuffix "-" -}}
{{- end -}}

{{/*
The Deployment's affinity: .Values.affinity, plus the podAntiAffinity preset
(soft: preferred, hard: required; by the selector labels, so replicas avoid each
other) unless preset is none or .Values.affinity has its own podAntiAffinity.
*/}}
{{- define "pooler.affinity" -}}
{{- $affinity := deepCopy (.Values.affinity | default dict) }}
{{- $anti := .Values.podAntiAffinity }}
{{- if and (ne $anti.preset "none") (not (hasKey $affinity "podAntiAffinity")) }}
{{- $term := dict "topologyKey" $anti.topologyKey "labelSelector" (dict "matchLabels" (include "pooler.selectorLabels" . | fromYaml)) }}
{{- if eq $anti.preset "hard" }}
{{- $_ := set $affinity "podAntiAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (list $term)) }}
{{- else }}
{{- $_ := set $affinity "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" (int $anti.weight) "podAffinityTerm" $term))) }}
{{- end }}
{{- end }}
{{- toYaml $affinity }}
{{- end -}}

{{/* The host clients are told to use in the pools API. */}}
{{- define "pooler.publicHost" -}}
{{- if .Values.sidecar.publicHost -}}
{{- .Values.sidecar.publicHost -}}
{{- else if eq .Values.mode "sidecar" -}}
127.0.0.1
{{- else -}}
{{- printf "%s.%s.svc" (include "pooler.fullname" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/*
Probes of the pooler container. Liveness and startup are a TCP check of the
pooler's own port: never the admin login, so a sidecar fault or a hashed admin
secret cannot get a healthy pooler restarted. Readiness (with the sidecar) is
its /readyz: the pooler accepts clients and reaches PostgreSQL; a paused
pooler stays ready, its clients queue.
*/}}
{{- define "pooler.probes" -}}
{{- if .Values.probes.startup.enabled }}
startupProbe:
  tcpSocket: {port: {{ .Values.config.listen_port }}}
  periodSeconds: {{ .Values.probes.startup.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.startup.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.startup.failureThreshold }}
{{- end }}
{{- if .Values.probes.liveness.enabled }}
livenessProbe:
  tcpSocket: {port: {{ .Values.config.listen_port }}}
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
{{- end }}
{{- if .Values.probes.readiness.enabled }}
readinessProbe:
  {{- if .Values.sidecar.enabled }}
  httpGet: {path: /readyz, port: {{ .Values.sidecar.port }}}
  {{- else }}
  tcpSocket: {port: {{ .Values.config.listen_port }}}
  {{- end }}
  periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
{{- end }}
{{- end -}}

{{/*
preStop: keep accepting while the Service drops this pod's endpoint. With the
sidecar, its GET /drain waits (no `sleep` needed in the image); without it, sleep.
*/}}
{{- define "pooler.preStop" -}}
{{- with .Values.preStopSleepSeconds }}
lifecycle:
  preStop:
    {{- if $.Values.sidecar.enabled }}
    httpGet: {path: "/drain?seconds={{ . }}", port: {{ $.Values.sidecar.port }}}
    {{- else }}
    exec:
      command: ["sleep", "{{ . }}"]
    {{- end }}
{{- end }}
{{- end -}}

{{/*
The containers: the pooler, and the admin sidecar if sidecar.enabled.
Used by this chart's Deployment, and by an application's pod spec in
mode: sidecar: "pooler.sidecarContainers" under its `containers:` and
"pooler.sidecarInitContainers" under its `initContainers:` (one of the two is
empty: sidecar.native puts them in initContainers with restartPolicy: Always,
Kubernetes 1.29+, so they start before the app and stop after it), with
"pooler.sidecarVolumes" under its `volumes:`.
*/}}
{{- define "pooler.sidecarContainers" -}}
{{- if not (and (eq .Values.mode "sidecar") .Values.sidecar.native) }}
{{- include "pooler.containers" . }}
{{- end }}
{{- end -}}

{{- define "pooler.sidecarInitContainers" -}}
{{- if and (eq .Values.mode "sidecar") .Values.sidecar.native }}
{{- include "pooler.containers" . }}
{{- end }}
{{- end -}}

{{- define "pooler.containers" -}}
- name: pooler
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if and (eq .Values.mode "sidecar") .Values.sidecar.native }}
  restartPolicy: Always
  {{- end }}
  command: ["pooler", "/etc/pooler/pooler.yaml"]
  ports:
    - name: postgres
      containerPort: {{ .Values.config.listen_port }}
      protocol: TCP
  env:
    - name: PYTHONDONTWRITEBYTECODE
      value: "1"
  {{- include "pooler.probes" . | trim | nindent 2 }}
  {{- include "pooler.preStop" . | trim | nindent 2 }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: pooler-config, mountPath: /etc/pooler, readOnly: true}
    - {name: pooler-userlist, mountPath: /etc/pooler-secret, readOnly: true}
    - {name: pooler-tmp, mountPath: /tmp}
{{- if .Values.sidecar.enabled }}
- name: pooler-sidecar
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if and (eq .Values.mode "sidecar") .Values.sidecar.native }}
  restartPolicy: Always
  {{- end }}
  command:
    - pooler-sidecar
    - --config=/etc/pooler/pooler.yaml
    # Not loopback: the kubelet's probes and Prometheus come in on the pod IP.
    # State-changing endpoints still need the token.
    - --host=0.0.0.0
    - --port={{ .Values.sidecar.port }}
    {{- if .Values.metrics.dedicatedPort.enabled }}
    - --metrics-port={{ include "pooler.scrapePort" . }}
    {{- end }}
    - --paused-file=/etc/pooler/paused
    {{- if .Values.sidecar.token.existingSecret }}
    - --token-file=/etc/pooler-sidecar/token
    {{- end }}
    {{- range .Values.sidecar.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  ports:
    - name: sidecar
      containerPort: {{ .Values.sidecar.port }}
      protocol: TCP
    {{- if .Values.metrics.dedicatedPort.enabled }}
    - name: metrics
      containerPort: {{ include "pooler.scrapePort" . }}
      protocol: TCP
    {{- end }}
  env:
    - name: PYTHONDONTWRITEBYTECODE
      value: "1"
    - name: POOLER_PUBLIC_HOST
      value: {{ include "pooler.publicHost" . | quote }}
    {{- if .Values.sidecar.adminPassword.existingSecret }}
    - name: POOLER_ADMIN_PASSWORD
      valueFrom:
        secretKeyRef:
          name: {{ .Values.sidecar.adminPassword.existingSecret }}
          key: {{ .Values.sidecar.adminPassword.key }}
    {{- end }}
  # Its own probes: the HTTP server answers (/livez needs no admin login).
  livenessProbe:
    httpGet: {path: /livez, port: {{ .Values.sidecar.port }}}
    periodSeconds: 10
    timeoutSeconds: 5
  readinessProbe:
    httpGet: {path: /livez, port: {{ .Values.sidecar.port }}}
    periodSeconds: 10
    timeoutSeconds: 5
  # It waits as long as the pooler's preStop, so /drain is served throughout.
  {{- include "pooler.preStop" . | trim | nindent 2 }}
  resources:
    {{- toYaml .Values.sidecar.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: pooler-config, mountPath: /etc/pooler, readOnly: true}
    - {name: pooler-userlist, mountPath: /etc/pooler-secret, readOnly: true}
    {{- if .Values.sidecar.token.existingSecret }}
    - {name: pooler-sidecar-token, mountPath: /etc/pooler-sidecar, readOnly: true}
    {{- end }}
{{- end }}
{{- end -}}

{{/* The volumes the containers above mount. */}}
{{- define "pooler.sidecarVolumes" -}}
- name: pooler-config
  configMap:
    name: {{ include "pooler.fullname" . }}
- name: pooler-userlist
  secret:
    secretName: {{ required "auth.existingSecret: a Secret holding the userlist is required" .Values.auth.existingSecret }}
    items:
      - {key: {{ .Values.auth.userlistKey }}, path: userlist.txt}
- name: pooler-tmp
  emptyDir: {medium: Memory, sizeLimit: 16Mi}
{{- if and .Values.sidecar.enabled .Values.sidecar.token.existingSecret }}
- name: pooler-sidecar-token
  secret:
    secretName: {{ .Values.sidecar.token.existingSecret }}
    items:
      - {key: {{ .Values.sidecar.token.key }}, path: token}
{{- end }}
{{- end -}}
