package alert

import (
	"testing"
	"time"

	"github.com/sluicehq/sluice/schemas/events"
)

// FuzzRule: no filter or annotation makes compiling or evaluating a rule panic.
func FuzzRule(f *testing.F) {
	f.Add(`type == "order.created" && data.amount > 1000`, `order {{ .data.order_id }}`)
	f.Add(`data.x[0] / 0 > 1`, `{{ .nope.deeper }}`)
	f.Add(`len(source) > 2 ? true : false`, `{{`)
	e := &events.Event{ID: "1", Source: "s", Type: "order.created", Key: "k", Time: time.Unix(0, 0), Data: []byte(`{"amount":5000,"order_id":"o","x":[1]}`)}
	env := Env(e)
	f.Fuzz(func(t *testing.T, filter, annotation string) {
		rules, err := CompileRules([]RuleConfig{{Name: "r", Filter: filter, Annotations: map[string]string{"a": annotation}}})
		if err != nil {
			return
		}
		if _, err := rules[0].Matches(env); err != nil {
			return
		}
		rules[0].Annotate(eventData(env, nil))
	})
}
