using LoraSharp.Adapters;

namespace LoraSharp.Formats;

/// <summary>The rank and effective scale of one module's weights under its file's conventions.</summary>
public static class AdapterScales
{
    /// <summary>The r of alpha/r (0 when nothing is decomposed, e.g. LoKr with two full factors under LyCORIS rules).</summary>
    public static int RankFor(ModuleAdapterWeights m) => (int)(m.Rank ?? AdapterFile.RankOf(m.Algorithm, m.Tensors));

    /// <summary>
    /// The scale the adapter engine applies (<see cref="LoraMath.Scale"/>, <see cref="LokrMath.Scale"/>): alpha/r or
    /// alpha/√r, alpha missing or 0 → alpha = r; LoKr with neither factor decomposed → 1 under LyCORIS rules, alpha/r
    /// with the configured r under PEFT rules; full diffs → 1.
    /// </summary>
    public static double Scale(ModuleAdapterWeights m)
    {
        if (m.Algorithm == AdapterAlgorithm.Full) return 1;
        if (m.Algorithm == AdapterAlgorithm.LoKr)
        {
            int decomposed = AdapterFile.RankOf(m.Algorithm, m.Tensors);
            return LokrMath.Scale(m.Alpha, decomposed == 0 ? null : decomposed, m.Rank, m.RsLora, m.Convention);
        }
        return LoraMath.Scale(m.Alpha, RankFor(m), m.RsLora);
    }
}
