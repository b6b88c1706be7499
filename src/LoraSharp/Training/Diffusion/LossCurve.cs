namespace LoraSharp.Training.Diffusion;

/// <summary>The loss curve of a run as a PNG (ScottPlot): raw step losses and their moving average.</summary>
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

    /// <summary>Writes the PNG atomically (temporary file, then rename).</summary>
    public static void Save(string path, IReadOnlyList<double> losses, string title)
    {
        var plot = new ScottPlot.Plot();
        double[] xs = Enumerable.Range(1, losses.Count).Select(i => (double)i).ToArray();
        var raw = plot.Add.Scatter(xs, losses.ToArray());
        raw.LegendText = "loss";
        raw.MarkerSize = 0;
        raw.LineWidth = 1;
        if (losses.Count >= 5)
        {
            var smooth = plot.Add.Scatter(xs, Smooth(losses, Math.Max(5, losses.Count / 20)));
            smooth.LegendText = "moving average";
            smooth.MarkerSize = 0;
            smooth.LineWidth = 2;
        }
        plot.Title(title);
        plot.XLabel("step");
        plot.YLabel("loss");
        plot.ShowLegend();
        var dir = Path.GetDirectoryName(Path.GetFullPath(path))!;
        var tmp = Path.Combine(dir, $".{Path.GetFileName(path)}.{Environment.ProcessId}.tmp.png");
        plot.SavePng(tmp, 900, 500);
        File.Move(tmp, path, overwrite: true);
    }
}
