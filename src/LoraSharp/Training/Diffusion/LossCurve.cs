namespace LoraSharp.Training.Diffusion;

/// <summary>
/// The loss curve of a training run as a PNG (ScottPlot): raw step losses, their moving average and optional evaluation
/// losses as markers. Used by the SD trainer, the LLM trainer and the demo pretrainer.
/// </summary>
public static class LossCurve
{
    /// <summary>Moving average over a centred window of <paramref name="window"/> steps (shrinking at the ends).</summary>
    public static double[] Smooth(IReadOnlyList<double> values, int window)
    {
        var result = new double[values.Count];
        for (int i = 0; i < values.Count; i++)
        {
            int a = Math.Max(0, i - window / 2), b = Math.Min(values.Count - 1, i + window / 2);
            double s = 0;
            for (int j = a; j <= b; j++) s += values[j];
            result[i] = s / (b - a + 1);
        }
        return result;
    }

    /// <summary>Writes the losses of steps 1, 2, … as a PNG, atomically (temporary file, then rename).</summary>
    public static void Save(string path, IReadOnlyList<double> losses, string title) =>
        Save(path, losses.Select((l, i) => ((long)i + 1, l)).ToList(), title);

    /// <summary>
    /// Writes (step, loss) points as a PNG, atomically: the raw curve, its moving average (from 5 points on) and, when
    /// given, evaluation losses as markers. Non-finite losses are left out.
    /// </summary>
    public static void Save(string path, IReadOnlyList<(long Step, double Loss)> train, string title,
        IReadOnlyList<(long Step, double Loss)>? eval = null, string xLabel = "step", string yLabel = "loss")
    {
        var plot = new ScottPlot.Plot();
        var finite = train.Where(t => double.IsFinite(t.Loss)).ToList();
        if (finite.Count > 0)
        {
            double[] xs = finite.Select(t => (double)t.Step).ToArray(), ys = finite.Select(t => t.Loss).ToArray();
            var raw = plot.Add.Scatter(xs, ys);
            raw.LegendText = eval is { Count: > 0 } ? "train loss" : "loss";
            raw.MarkerSize = 0;
            raw.LineWidth = 1;
            if (ys.Length >= 5)
            {
                var smooth = plot.Add.Scatter(xs, Smooth(ys, Math.Max(5, ys.Length / 20)));
                smooth.LegendText = "moving average";
                smooth.MarkerSize = 0;
                smooth.LineWidth = 2;
            }
        }
        var ev = (eval ?? []).Where(t => double.IsFinite(t.Loss)).ToList();
        if (ev.Count > 0)
        {
            var points = plot.Add.Scatter(ev.Select(t => (double)t.Step).ToArray(), ev.Select(t => t.Loss).ToArray());
            points.LegendText = "eval loss";
            points.MarkerSize = 8;
            points.LineWidth = 0;
        }
        plot.Title(title);
        plot.XLabel(xLabel);
        plot.YLabel(yLabel);
        plot.ShowLegend();
        var dir = Path.GetDirectoryName(Path.GetFullPath(path))!;
        var tmp = Path.Combine(dir, $".{Path.GetFileName(path)}.{Environment.ProcessId}.tmp.png");
        plot.SavePng(tmp, 900, 500);
        File.Move(tmp, path, overwrite: true);
    }
}
