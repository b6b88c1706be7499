namespace LoraSharp.Training.Llm;

/// <summary>The loss curve as a PNG (ScottPlot): training loss per step, evaluation loss as markers.</summary>
public static class LlmLossPlot
{
    public static void Write(string path, IReadOnlyList<(long Step, double Loss)> train, IReadOnlyList<(long Step, double Loss)> eval, int width = 900, int height = 500)
    {
        var plot = new ScottPlot.Plot();
        var finite = train.Where(t => double.IsFinite(t.Loss)).ToList();
        if (finite.Count > 0)
        {
            var line = plot.Add.Scatter(finite.Select(t => (double)t.Step).ToArray(), finite.Select(t => t.Loss).ToArray());
            line.LegendText = "train loss";
            line.MarkerSize = finite.Count > 60 ? 0 : 4;
        }
        var ev = eval.Where(t => double.IsFinite(t.Loss)).ToList();
        if (ev.Count > 0)
        {
            var points = plot.Add.Scatter(ev.Select(t => (double)t.Step).ToArray(), ev.Select(t => t.Loss).ToArray());
            points.LegendText = "eval loss";
            points.MarkerSize = 8;
        }
        plot.Title("Training loss");
        plot.XLabel("optimizer step");
        plot.YLabel("cross-entropy per token");
        plot.ShowLegend();
        var tmp = path + ".tmp.png";
        plot.SavePng(tmp, width, height);
        File.Move(tmp, path, overwrite: true);
    }
}
